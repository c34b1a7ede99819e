# Shared by the launch scripts: dry-run aware command runner and argument checks. Source it, don't run it.

DRY_RUN=0

# quote ARG: ARG as a shell word (single-quoted only where needed, so dry runs read like commands).
quote() {
  if [[ $1 =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# run CMD...: print it (one line, prefixed "+ ") and run it unless --dry_run.
run() {
  local line="" arg
  for arg in "$@"; do line+="$(quote "$arg") "; done
  echo "+ ${line% }"
  if [[ $DRY_RUN == 0 ]]; then "$@"; fi
}

# die MESSAGE: a usage error (exit 2), with the script's usage text.
die() {
  echo "error: $1" >&2
  echo >&2
  usage >&2
  exit 2
}

# need NAME VALUE: fail with a usage error when a required option is empty.
need() {
  [[ -n $2 ]] || die "--$1 is required"
}

# positive_int NAME VALUE
positive_int() {
  [[ $2 =~ ^[1-9][0-9]*$ ]] || die "--$1 must be a positive integer, got '$2'"
}

# parse_args "$@": sets the variables named by VALUE_FLAGS (flag -> variable, '--flag=v' or '--flag v') and
# SWITCH_FLAGS (flag -> variable set to 1); --dry_run, --help, and EXTRA=(everything after --) for all.
parse_args() {
  local flag value
  EXTRA=()
  while [[ $# -gt 0 ]]; do
    flag=${1#--}
    flag=${flag%%=*}
    case $1 in
      --dry_run) DRY_RUN=1 ;;
      -h|--help) usage; exit 0 ;;
      --) shift; EXTRA=("$@"); return ;;
      --*)
        if [[ -n ${SWITCH_FLAGS[$flag]:-} && $1 != *=* ]]; then
          printf -v "${SWITCH_FLAGS[$flag]}" 1
        elif [[ -n ${VALUE_FLAGS[$flag]:-} ]]; then
          if [[ $1 == *=* ]]; then
            value=${1#*=}
          else
            [[ $# -ge 2 ]] || die "$1 needs a value"
            value=$2
            shift
          fi
          printf -v "${VALUE_FLAGS[$flag]}" '%s' "$value"
        else
          die "unknown argument '$1'"
        fi ;;
      *) die "unknown argument '$1'" ;;
    esac
    shift
  done
}

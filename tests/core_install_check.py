"""What the core install promises, run in a virtual environment holding `pip install .` alone (make test-core):
no PyTorch, transformers or gguf anywhere; the package imports, its CPU kernels were built at install and, without
MKL (the cpu extra), step aside for XLA's ops; a 2-step pretraining and a linear
probe run on the shipped sample; and a command that needs an extra says which one. Exits non-zero on a broken
promise, naming it."""

import importlib.metadata
import importlib.util
import os
import subprocess
import sys
import sysconfig
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    for name in ("torch", "transformers", "gguf", "safetensors"):
        assert importlib.util.find_spec(name) is None, f"{name} is installed in the core environment"
    import mvlp_jax.kernels  # noqa: F401 - the CPU kernels' module imports without torch
    from mvlp_jax.kernels import cpu_blas

    # the wheel pip built and installed (the checkout's own egg-info, first on sys.path here, is not asked)
    wheel = next(importlib.metadata.distributions(name="mvlp_jax", path=[sysconfig.get_paths()["platlib"]]))
    installed = [f for f in wheel.files if f.name.startswith("_mkl_kernels")]
    assert installed and installed[0].locate().stat().st_size > 0, "`pip install .` did not build the CPU kernels"
    assert not cpu_blas.mkl_candidates() and not cpu_blas.load(), "MKL found without the cpu extra"
    print(f"core install: CPU kernels built by pip ({installed[0]}); without the cpu extra: XLA's ops")
    from data_prep.build_dataset import build
    from mvlp_jax.evaluation import evaluate
    from mvlp_jax.pretrain import train
    from mvlp_jax.runtime import schema
    from mvlp_jax.tools.demo import DATASETS
    from tests.pretrain_setup import micro_config

    with tempfile.TemporaryDirectory() as root:
        data_dir = os.path.join(root, "tfds")
        for name in ("covid_notes", "nih_sample"):
            options = dict(DATASETS[name], image_size=64)
            build("csv", options.pop("input_dir"), data_dir, name=name, **options)
        workdir = os.path.join(root, "mae")
        train.train(micro_config(data_dir, "", objectives={"mae": 1.0}, total_steps=2), workdir)
        probe = schema.load_file(os.path.join(REPO, "configs", "linear_probe.py"), "nih_sample")
        probe.data_dir, probe.workdirs, probe.bootstrap, probe.batch_size = data_dir, f"{workdir},random_init", 50, 32
        rows = evaluate.evaluate(probe, os.path.join(root, "eval"))["checkpoints"]
        assert [r["name"] for r in rows] == ["mae", "random_init"], rows
        print(
            "core install: pretrained 2 steps and probed: "
            + ", ".join(f"{r['name']} mAUC {r['mauc']:.3f}" for r in rows)
        )
        job = subprocess.run(
            [
                sys.executable,
                "-m",
                "data_prep.precompute_text_embeddings",
                f"--data_dir={data_dir}",
                "--dataset=covid_notes",
                "--model=smollm2",
                f"--output_dir={root}/emb",
            ],
            capture_output=True,
            text=True,
            cwd=REPO,
        )
        assert job.returncode != 0 and "pip install 'mvlp_jax[llm]'" in job.stderr, job.stderr[-2000:]
        said = next(line for line in job.stderr.splitlines() if "mvlp_jax[llm]" in line)
        print(f"a command needing an extra says so:\n{said}")


if __name__ == "__main__":
    main()

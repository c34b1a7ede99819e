"""Experiment configs: each file's `get_config(arg)` returns a ConfigDict; `arg` names variants, comma-separated
(`configs/pretrain.py:demo,vitdet`), read by `common.parse_arg`."""

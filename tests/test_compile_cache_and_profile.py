"""What a pod run needs that a CPU never shows: a restarted run reads its train step from JAX's persistent
compilation cache instead of compiling it again, and a profiler window writes a trace TensorBoard can open while
training goes on."""

import glob
import os
import re

from tests.pretrain_setup import write_config_file
from tests.test_pretrain_runs import ONE_DEVICE, _finish, _main


def test_a_second_start_reads_the_train_step_from_the_compilation_cache_and_a_profile_is_written(
    pretrain_data, tmp_path
):
    data_dir, emb_dir, _ = pretrain_data
    cache = tmp_path / "xla_cache"
    config = write_config_file(
        str(tmp_path / "c.py"), data_dir, emb_dir, total_steps=4, compilation_cache_dir=str(cache), profile_steps="2,3"
    )
    first = _finish(_main(config, str(tmp_path / "first"), env=ONE_DEVICE))
    ready = re.search(r"train step ready in ([\d.]+) s \(compilation cache (\w+), (.+)\)", first)
    assert ready and ready.group(2) == "miss" and ready.group(3) == str(cache), first[-2000:]
    entries = set(os.listdir(cache))
    assert any(name.startswith("jit_train_step") for name in entries), entries

    trace = glob.glob(str(tmp_path / "first" / "plugins" / "profile" / "*" / "*.xplane.pb"))
    assert len(trace) == 1 and os.path.getsize(trace[0]) > 0
    assert f"profile of steps 2-3 written to {tmp_path / 'first'}/plugins/profile" in first
    assert "step 4/4" in first and "done: saved step 4" in first  # training went on after the window

    second = _finish(_main(config, str(tmp_path / "second"), "--config.profile_steps=", env=ONE_DEVICE))
    again = re.search(r"train step ready in ([\d.]+) s \(compilation cache (\w+),", second)
    assert again and again.group(2) == "hit", second[-2000:]
    assert not [n for n in set(os.listdir(cache)) - entries if n.startswith("jit_train_step")]
    assert not os.path.exists(tmp_path / "second" / "plugins")
    print(f"train step: compiled in {ready.group(1)} s, read from the cache in {again.group(1)} s")

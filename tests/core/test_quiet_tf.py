"""Tests of pneumo_tf.core.quiet_tf: TensorFlow's start-up banner stays off the console by default."""

import os
import subprocess
import sys

from conftest import REPO
from pneumo_tf.core import quiet_tf

BANNER = ["WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
          "I0000 00:00:1796116796.943127   12555 port.cc:153] oneDNN custom operations are on.",
          "I0000 00:00:1796116796.943871   12555 cudart_stub.cc:31] Could not find cuda drivers",
          "I0000 00:00:1796116797.012068   12555 cpu_feature_guard.cc:227] This TensorFlow binary",
          "To enable the following instructions: AVX2 AVX512F FMA, in other operations, rebuild "
          "TensorFlow with the appropriate compiler flags.",
          "E0000 00:00:1796116811.237156   12555 cuda_platform.cc:52] failed call to cuInit: "
          "INTERNAL: CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)"]


def test_filter_drops_the_banner_and_keeps_everything_else():
    real = ["E0000 00:00:1.0 123 op_kernel.cc:1] a real error", "Traceback (most recent call)"]
    assert quiet_tf.filtered("\n".join(BANNER + real)) == "\n".join(real) + "\n"


def test_banner_wanted_by_verbosity_or_the_users_env():
    assert not quiet_tf.banner_wanted(["app"], {})
    assert quiet_tf.banner_wanted(["app", "--verbosity=1"], {})
    assert not quiet_tf.banner_wanted(["app", "--verbosity=0"], {})
    assert quiet_tf.banner_wanted(["app"], {"TF_CPP_MIN_LOG_LEVEL": "2"})
    assert not quiet_tf.banner_wanted(["app"], {"TF_CPP_MIN_LOG_LEVEL": "1",
                                                quiet_tf.DEFAULTED: "1"})
    assert quiet_tf.banner_wanted(["app"], {"PNEUMO_TF_TF_BANNER": "1"})


SCRIPT = ("import pneumo_tf, sys\nimport tensorflow as tf\n"
          "print(len(tf.config.list_physical_devices('CPU')))\n"
          "print('after import', file=sys.stderr)\n")


def _run(*args, **env_extra):
    env = {k: v for k, v in os.environ.items()
           if k not in ("TF_CPP_MIN_LOG_LEVEL", quiet_tf.DEFAULTED)}
    env.update(env_extra, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-c", SCRIPT, *args], capture_output=True, text=True,
                          env=env, timeout=180)


def test_a_default_process_prints_no_banner_and_verbosity_brings_it_back():
    quiet = _run()
    assert quiet.returncode == 0 and quiet.stdout.strip() == "1"
    assert quiet.stderr.strip() == "after import", quiet.stderr
    loud = _run("--verbosity=1")
    assert "InitializeLog" in loud.stderr or "cuda" in loud.stderr.lower(), loud.stderr

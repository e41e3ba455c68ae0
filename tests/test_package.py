"""The installed package: its version, and a clear refusal beside PyPI's unrelated 'kernels'."""
import os
import subprocess
import sys

import kernels


def test_version_is_the_distribution_version():
    from importlib import metadata

    assert kernels.__version__ == metadata.version("ffnn-fused-kernels")


def test_namesake_distribution_is_refused(tmp_path):
    """With PyPI's 'kernels' installed (its metadata on the path), importing ours says what to do."""
    info = tmp_path / "kernels-0.17.2.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: kernels\nVersion: 0.17.2\n"
                                   "Summary: Download compute kernels\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), *sys.path]))
    run = subprocess.run([sys.executable, "-c", "import kernels"], env=env, capture_output=True, text=True)
    assert run.returncode != 0
    assert "the unrelated PyPI package 'kernels' 0.17.2 is installed" in run.stderr
    assert "pip uninstall -y kernels" in run.stderr

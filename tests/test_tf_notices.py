"""TensorFlow's import notices are dropped from stderr, everything else is kept (in-process
parts; tests/test_console.py checks a real command's first screen)."""

import os
import sys

from vitvq import tf_notices

ONEDNN = (
    "I0000 00:00:1796599987.489316   20608 port.cc:153] oneDNN custom operations are on. You "
    "may see slightly different numerical results due to floating-point round-off errors."
)
ABSL = "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"


def test_the_notices_are_dropped_and_the_rest_kept_in_order(capfd):
    with tf_notices.notices_dropped():
        os.write(2, f"first\n{ABSL}\n{ONEDNN}\n".encode())
        os.write(2, f"{ABSL}\n{ONEDNN}\nW a real warning\n".encode())
    assert capfd.readouterr().err == "first\nW a real warning\n"
    os.write(2, f"{ONEDNN}\n".encode())  # after the block nothing is held back
    assert capfd.readouterr().err == f"{ONEDNN}\n"


def test_the_first_import_of_a_package_is_quiet_and_only_the_first(capfd, tmp_path, monkeypatch):
    package = tmp_path / "noisy_pkg"
    package.mkdir()
    (package / "__init__.py").write_text(
        "import os\n"
        f"os.write(2, {ABSL!r}.encode() + b'\\n' + {ONEDNN!r}.encode() + b'\\nkept\\n')\n"
        "DATA = __loader__.get_data(__file__.replace('__init__.py', 'data.txt'))\n"
    )
    (package / "data.txt").write_text("payload")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "noisy_pkg", raising=False)
    finders = list(sys.meta_path)
    try:
        tf_notices.quiet_first_import("noisy_pkg")
        tf_notices.quiet_first_import("noisy_pkg")  # installed once
        assert len(sys.meta_path) == len(finders) + 1
        import noisy_pkg

        assert capfd.readouterr().err == "kept\n"
        assert noisy_pkg.DATA == b"payload"  # the package's loader still serves its files
        assert sys.meta_path == finders  # the finder left after the first import
    finally:
        sys.meta_path[:] = finders
        sys.modules.pop("noisy_pkg", None)

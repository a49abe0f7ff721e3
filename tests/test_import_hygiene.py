"""The service layer and the CLI's non-TUI paths must never pull in Textual."""

import subprocess
import sys

SERVICES = ["results", "loop", "mounts", "blockdevs", "config", "replication", "status", "control"]


def _imported_in_fresh_interpreter(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys; print('\\n'.join(sys.modules))"],
                         check=True, capture_output=True, text=True).stdout
    return set(out.split())


def test_services_do_not_import_textual():
    code = "\n".join(f"import app.services.{name}" for name in SERVICES)
    modules = _imported_in_fresh_interpreter(code)
    assert "app.services.loop" in modules  # the import really happened
    assert not any(m == "textual" or m.startswith("textual.") for m in modules)


def test_cli_module_does_not_import_textual():
    modules = _imported_in_fresh_interpreter("import app.cli")
    assert "app.cli" in modules
    assert "textual" not in modules

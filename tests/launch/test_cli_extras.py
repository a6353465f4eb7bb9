"""`otr-megatron <cmd>` without the extra it needs: one line naming the module and the extra."""

import sys

from otr_megatron import cli


def test_missing_dependency_names_module_and_extra(tmp_path, monkeypatch, capsys):
    (tmp_path / "needs_missing_dep.py").write_text("import not_installed_dep_xyz\n\ndef main(argv):\n    return 0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cli.SUBCOMMANDS, "plan", ("needs_missing_dep", "test double"))
    assert cli.main(["plan"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == ("otr-megatron plan: needs the module 'not_installed_dep_xyz', which is not installed; "
                           "pip install 'otr-megatron[launch]'")
    sys.modules.pop("needs_missing_dep", None)

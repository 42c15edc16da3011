"""The documentation a user reads: the README stays a front page, and every relative link in it and in docs/
resolves to a file of the repository."""

import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def relative_links(path: Path) -> list[str]:
    return [t for t in LINK.findall(path.read_text()) if not re.match(r"[a-z]+:", t) and not t.startswith("#")]


def test_readme_is_a_front_page():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; results and reference belong in docs/"


def test_every_relative_link_resolves():
    files = markdown_files()
    assert len(files) >= 10  # the README and docs/ with its results/
    broken = [
        f"{path.relative_to(ROOT)}: {target}"
        for path in files
        for target in relative_links(path)
        if not (path.parent / target.split("#")[0]).exists()
    ]
    assert not broken, broken


def test_link_check_sees_a_broken_link(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("[ok](page.md) [gone](missing.md) [web](https://example.org) [anchor](#x)")
    assert relative_links(page) == ["page.md", "missing.md"]
    assert [t for t in relative_links(page) if not (tmp_path / t).exists()] == ["missing.md"]


def bench_module(name: str):
    import importlib.util

    sys.path.insert(0, str(ROOT / "bench"))  # (the benches import their common module)
    spec = importlib.util.spec_from_file_location(f"{name}_bench", ROOT / f"bench/{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("bench, result", [("depth", "depth.json"), ("flops", "flops.json")])
def test_generated_tables_match_their_json(bench, result):
    """A results table in docs/ that a bench renders from its committed JSON equals what it renders now."""
    import json

    module = bench_module(bench)
    results = json.loads((ROOT / "bench/results" / result).read_text())
    doc = module.DOC.read_text()
    assert doc.count(module.TABLE_BEGIN) == 1 and doc.count(module.TABLE_END) == 1
    table = doc.split(module.TABLE_BEGIN, 1)[1].split(module.TABLE_END, 1)[0].strip()
    assert table == module.markdown_table(results), f"stale: run python bench/{bench}.py --render"
    assert table.count("|") > 20  # a table with the JSON's rows, not an empty block


def test_templated_tables_match_their_json():
    """Every table bench/tables/ renders from bench/results/ equals the one its document holds."""
    tables = bench_module("tables")
    assert len(tables.names()) >= 3
    for name in tables.names():
        assert tables.held(name) == tables.render_template(name), f"stale table {name}: run python bench/tables.py"


def test_table_placeholders_read_paths_selectors_and_formats(tmp_path, monkeypatch):
    tables = bench_module("tables")
    data = {"rows": [{"shape": "a", "x": 1.0, "v": 2.0}, {"shape": "b", "x": 0.5, "v": 3.14159}]}
    data["summary"] = {"m": {"mean": 1.23456, "spread": 0.0449}, "bytes": 3 * 2**20}
    (tmp_path / "r.json").write_text(json.dumps(data))
    (tmp_path / "t.md").write_text(
        "doc: x.md\n| {{ r.json : rows[shape=b,x=0.5].v : .2f }} | {{ r.json : rows.0.v }} | "
        "{{ r.json : summary.m : pm2 }} | {{ r.json : summary.bytes : mib }} |\n"
    )
    monkeypatch.setattr(tables, "RESULTS", tmp_path)
    monkeypatch.setattr(tables, "TEMPLATES", tmp_path)
    assert tables.render_template("t") == "| 3.14 | 2.0 | 1.23 +- 0.04 | 3 |"
    (tmp_path / "t.md").write_text("doc: x.md\n{{ r.json : rows[shape=c].v }}\n")
    with pytest.raises(KeyError, match=r"t.md: r.json: no element of 'rows' with \{'shape': 'c'\}"):
        tables.render_template("t")


def test_every_result_records_command_device_date_and_commit():
    """bench/results/ under one schema (bench/common.py write_results; older files migrated by
    bench/migrate_results.py, which says in `provenance` what it inferred)."""
    import json

    files = sorted((ROOT / "bench/results").glob("*.json"))
    assert len(files) >= 40
    for path in files:
        data = json.loads(path.read_text())
        missing = [k for k in ("command", "device_info", "date", "commit") if k not in data]
        assert not missing, f"{path.name} lacks {missing}: run python bench/migrate_results.py"
        assert isinstance(data["command"], str) or "command_note" in data, path.name
        assert data["date"] and data["device_info"], path.name

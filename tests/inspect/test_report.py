"""effopt.explain, the report's text / JSON / HTML forms, `effopt inspect` and EFFOPT_LOG, checked against
known rewrites on small models (exact match counts and source lines)."""
import inspect as pyinspect
import json
import os
import re
import shutil
import subprocess
import sys
import warnings

import pytest
import torch

import effopt
from effopt import logs
from effopt.inspect.report import WIDTH
from effopt.testing.models import Attention, vit_tiny_test

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _attention_lines() -> set[int]:
    """The lines of the attention written out op by op in effopt/testing/models.py."""
    src, first = pyinspect.getsourcelines(Attention.forward)
    return {first + i for i, line in enumerate(src) if "attn" in line and ("@" in line)}


@pytest.fixture(scope="module")
def vit_report():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return effopt.explain(vit_tiny_test().eval(), (torch.randn(2, 3, 32, 32),), rounds=3)


def test_explain_reports_each_pass_with_counts_and_user_source_lines(vit_report):
    r = vit_report
    assert r.rewrites()["fuse_attention"] == 2  # one per block
    rec = next(p for p in r.passes if p.name == "fuse_attention")
    lines = {int(loc.rsplit(":", 1)[1]) for loc in rec.locations if "effopt/testing/models.py" in loc}
    assert lines and lines <= _attention_lines(), (rec.locations, _attention_lines())
    assert rec.nodes_after < rec.nodes_before and rec.added >= 2  # the fused ops (and their views)
    assert rec.nodes_before + rec.added - rec.removed == rec.nodes_after
    # the graph before and after, and what the fusion removed
    b, a = r.before["stats"], r.after["stats"]
    assert b["ops"]["_softmax"] == 2 and "_softmax" not in a["ops"]
    assert a["ops"]["scaled_dot_product_attention"] == 2
    assert b["macs"] == a["macs"] > 0 and abs(b["weight_bytes"] - a["weight_bytes"]) <= 0.01 * b["weight_bytes"]
    assert "def forward" in r.before["code"] and "scaled_dot_product_attention" in r.after["code"]


def test_profile_times_every_kernel_on_the_example_inputs(vit_report):
    prof = vit_report.profile
    kinds = {p["kind"] for p in prof}
    assert "tvm" in kinds and all(p["ms"] > 0 for p in prof)
    tvm_regions = {k.name for k in vit_report.lowering.kernels if k.choice == "tvm"}
    assert {p["node"] for p in prof if p["kind"] == "tvm"} <= {f"{n}" for n in tvm_regions} | \
        {p["node"] for p in prof if p["kind"] == "tvm"}
    assert any(p["kind"] == "tvm" and p["ops"] and p["ops"][0] != p["node"] for p in prof)  # ops named
    # the wall time beside the kernels' sum: the graph as one call, and the model called through torch.compile
    w = vit_report.wall
    assert w["kernels_ms"] == pytest.approx(sum(p["ms"] for p in prof))
    assert w["graph_ms"] > 0 and w["call_ms"] > 0
    assert "wall time: the graph" in str(vit_report) and "between kernels" in str(vit_report)


def test_text_form_fits_a_terminal(vit_report):
    text = str(vit_report)
    lines = text.splitlines()
    assert lines[0].startswith("effopt report: ") and "rewrite(s)" in lines[0]
    assert all(len(line) <= WIDTH for line in lines), max(lines, key=len)
    assert "fuse_attention: 2 match(es)" in text and "profile on the example inputs" in text
    assert len(lines) < 60


def test_json_form_round_trips(vit_report):
    d = json.loads(vit_report.to_json())
    fa = next(p for p in d["passes"] if p["name"] == "fuse_attention")
    assert fa["matches"] == 2 and fa["locations"]
    assert d["graph_before"]["nodes"] > d["graph_after"]["nodes"]
    assert d["lowering"]["kernels"] and {k["choice"] for k in d["lowering"]["kernels"]} <= {"tvm", "eager"}
    assert d["profile"] and d["profile"][0]["ms"] > 0
    assert set(d["wall"]) == {"kernels_ms", "graph_ms", "call_ms"}


def _external_fetches(page: str) -> list[str]:
    found = re.findall(r"""(?:src|href|action)\s*=\s*["']?\s*(?:https?:)?//[^"'\s>]*""", page, re.I)
    found += re.findall(r"url\(\s*['\"]?\s*(?:https?:)?//", page, re.I) + re.findall(r"@import", page)
    return found + re.findall(r"<script|<link|<iframe", page, re.I)


def test_html_is_self_contained_and_highlights_the_rewrites(vit_report, tmp_path):
    path = vit_report.save_html(str(tmp_path / "report.html"))
    page = open(path, encoding="utf-8").read()
    assert not _external_fetches(page)
    for section in ("Passes", "Graph statistics", "Graph", "Fallbacks", "Kernels", "Profile"):
        assert f">{section}</h2>" in page
    # block 0's fused attention is drawn; block 1 is the same ops, collapsed into one row
    assert len(re.findall(r'data-pass="fuse_attention"', page)) == 1
    assert "blocks.1: 1 block(s) as blocks.0" in page
    assert "graph before the passes (code)" in page and ": Relax</summary>" in page
    assert page.count(": scheduled TIR</summary>") == vit_report.lowering.unique_kernels
    assert "not available" not in page and "T.prim_func" in page
    assert page.count("<svg") >= 2  # the graph and the profile's bars


@pytest.mark.slow
def test_a_twelve_layer_vit_stays_readable():
    torch.manual_seed(0)
    model = vit_tiny_test(depth=12).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = effopt.explain(model, (torch.randn(1, 3, 32, 32),), profile=False, lower=False)
    assert report.rewrites()["fuse_attention"] == 12
    page = report.to_html()
    drawn = len(re.findall(r'<g class="node', page))
    per_block = sum(1 for n in report.after["graph"].graph.nodes if "blocks.0" in str(n.meta.get("nn_module_stack")))
    assert drawn < 3 * max(per_block, 1) + 40, drawn  # blocks 1-11 drawn as one row
    assert re.search(r"blocks\.1 \.\. blocks\.11: 11 block\(s\) as blocks\.0", page), \
        re.findall(r"blocks[^<]{0,60}block\(s\)[^<]*", page)
    assert all(len(line) <= WIDTH for line in str(report).splitlines())


def test_fallbacks_are_listed_with_their_reason(tmp_path):
    class Sorts(torch.nn.Module):
        def forward(self, x):
            return torch.sort(x * 2, dim=-1).values + 1

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = effopt.explain(Sorts(), (torch.randn(4, 16),), profile=True)
    assert "aten.sort.default" in report.lowering.fallbacks
    assert any(p["kind"] == "eager" and p["ops"] == ["sort"] for p in report.profile)
    page = report.to_html()
    assert "aten.sort.default" in page and "no TVM lowering" in page
    assert "1 op(s) in eager" in " ".join(str(report).splitlines()[:2])


@pytest.mark.slow
def test_token_merging_adds_the_merged_patch_picture():
    torch.manual_seed(0)
    model = vit_tiny_test(depth=4, img_size=64).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = effopt.explain(model, (torch.randn(1, 3, 64, 64),), profile=False, lower=False, token_merge=8)
    png = report.images.get("token_merges")
    assert png is not None and png[:8] == b"\x89PNG\r\n\x1a\n"
    assert "data:image/png;base64," in report.to_html()


@pytest.mark.slow
def test_effopt_inspect_command(tmp_path):
    model_file = tmp_path / "tiny.py"
    model_file.write_text("import torch\nfrom effopt.testing.models import vit_tiny_test\n\n"
                          "def effopt_model():\n    torch.manual_seed(0)\n"
                          "    return vit_tiny_test(), (torch.randn(1, 3, 32, 32),)\n")
    html_path, json_path = tmp_path / "r.html", tmp_path / "r.json"
    proc = subprocess.run([sys.executable, "-m", "effopt.cli", "inspect", str(model_file), "--options",
                           '{"lower": false}', "--html", str(html_path), "--json", str(json_path)],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "fuse_attention: 2 match(es)" in proc.stdout
    assert json.loads(json_path.read_text())["passes"] and "<svg" in html_path.read_text()
    bad = tmp_path / "none.py"
    bad.write_text("x = 1\n")
    proc = subprocess.run([sys.executable, "-m", "effopt.cli", "inspect", str(bad)], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert proc.returncode != 0 and "defines no effopt_model()" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "effopt.cli", "inspect", str(model_file), "--options",
                           '{"token_merge": "lots"}'], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode != 0 and "token_merge" in proc.stderr


@pytest.mark.slow
def test_effopt_log_channels():
    assert logs.parse("passes, lowering") == ["passes", "lowering"]
    assert logs.parse("all") == list(logs.CHANNELS)
    with pytest.raises(ValueError, match=r"unknown channel\(s\) \['pases'\]; valid: \['passes', 'lowering'"):
        logs.parse("pases")
    code = ("import torch, effopt\nfrom effopt.testing.models import vit_tiny_test\n"
            "m = torch.compile(vit_tiny_test().eval(), backend='effopt', options={'lower': False})\n"
            "with torch.no_grad(): m(torch.randn(1, 3, 32, 32))\n")
    env = dict(os.environ, EFFOPT_LOG="passes")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "[effopt.passes] fuse_attention: 2 match(es)" in proc.stderr
    assert "[effopt.lowering]" not in proc.stderr


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="no chromium (make test installs Debian's chromium when it can)")
def test_the_page_renders_in_headless_chromium(vit_report, tmp_path):
    path = vit_report.save_html(str(tmp_path / "report.html"))
    proc = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom",
                           f"file://{path}"], capture_output=True, text=True, timeout=120)
    dom = proc.stdout
    assert "effopt report" in dom and 'data-pass="fuse_attention"' in dom, proc.stderr[-2000:]
    shot = tmp_path / "shot.png"
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                    "--window-size=1200,900", f"file://{path}"], capture_output=True, timeout=120)
    from PIL import Image

    img = Image.open(shot).convert("L")
    lo, hi = img.getextrema()
    assert hi - lo > 100  # something is drawn, not a blank page

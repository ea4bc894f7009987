"""CompareReport.to_html(): a self-contained page with the SQNR chart and the worst layers' histograms."""
from __future__ import annotations

import base64
import importlib
import re
import sys
import warnings
from html.parser import HTMLParser

import pytest
import torch
import torch.nn as nn

import qcast
from qcast.report import plots

compare_mod = importlib.import_module("qcast.report.compare")  # the package exports the function as `compare`

PNG = b"\x89PNG\r\n\x1a\n"


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 8 * 8, 10)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        x = torch.relu(self.conv3(x))
        return self.fc(x.flatten(1))


@pytest.fixture(scope="module")
def report():
    torch.manual_seed(0)
    model = Net().eval()
    g = torch.Generator().manual_seed(0)
    qmodel = qcast.quantize(model, [torch.randn(2, 3, 8, 8, generator=g) for _ in range(4)], progress=False)
    return qcast.compare(model, qmodel, [torch.randn(2, 3, 8, 8, generator=g) for _ in range(3)])


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.imgs: list[dict] = []
        self.cells: list[str] = []
        self.text: list[str] = []
        self.stack: list[str] = []
        self._td = False

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.imgs.append(dict(attrs))
        elif tag == "td":
            self._td = True
            self.cells.append("")

    def handle_endtag(self, tag):
        if tag == "td":
            self._td = False

    def handle_data(self, data):
        self.text.append(data)
        if self._td:
            self.cells[-1] += data


def _parse(path) -> tuple[str, _Page]:
    page = path.read_text(encoding="utf-8")
    p = _Page()
    p.feed(page)
    p.close()
    return page, p


def test_html_has_sqnr_chart_and_worst_layer_histograms(report, tmp_path):
    pytest.importorskip("matplotlib")
    with_range = [r for r in report.layers if r.range is not None]
    expected_hists = min(compare_mod.HIST_LAYERS, len(with_range))
    assert expected_hists >= 3, report.table()
    # the samples are kept for the worst layers only, bounded, with the exact float extremes
    assert set(report.samples) == {r.name for r in with_range[:expected_hists]}
    for values, fmin, fmax in report.samples.values():
        assert 0 < len(values) <= 100_000 and fmin <= values.min() and values.max() <= fmax

    out = tmp_path / "report.html"
    report.to_html(out)
    page, parsed = _parse(out)
    assert not re.search(r'(src|href)="(?!data:)', page)  # self-contained: nothing to fetch
    srcs = [a["src"] for a in parsed.imgs]
    assert len(srcs) == 1 + expected_hists, srcs and [s[:40] for s in srcs]
    assert len(re.findall(r'<img [^>]*src="data:image/png;base64,', page)) == 1 + expected_hists
    for src in srcs:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(PNG)
    # every layer is in the table; the histogram figures name the worst layers
    first_col = parsed.cells[::7]
    assert first_col == [r.name for r in report.layers]
    alts = [a["alt"] for a in parsed.imgs]
    assert alts[0] == "per-layer SQNR"
    assert alts[1:] == [f"activations of {r.name}" for r in with_range[:expected_hists]]
    assert plots.NOTICE not in page


def test_sqnr_chart_follows_graph_order(report):
    assert report.order[0] == "conv1" and report.order.index("conv2") < report.order.index("conv3")
    assert sorted(report.order) == sorted(r.name for r in report.layers)


def test_html_without_matplotlib_has_tables_notice_and_warns(report, tmp_path, monkeypatch):
    for mod in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib...` now raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    monkeypatch.setattr(plots, "_warned", False)
    out = tmp_path / "report.html"
    with pytest.warns(RuntimeWarning, match=r"pip install qcast\[report\]"):
        report.to_html(out)
    page, parsed = _parse(out)
    assert parsed.imgs == [] and "data:image/png" not in page
    assert "pip install qcast[report]" in "".join(parsed.text)
    assert parsed.cells[::7] == [r.name for r in report.layers]
    # warned once: a second page says it again in the page but does not warn again
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report.to_html(tmp_path / "again.html")
    assert plots.NOTICE in (tmp_path / "again.html").read_text(encoding="utf-8")


def test_hist_samples_zero_keeps_no_samples_and_no_histograms(tmp_path):
    pytest.importorskip("matplotlib")
    torch.manual_seed(1)
    model = Net().eval()
    qmodel = qcast.quantize(model, [torch.randn(2, 3, 8, 8) for _ in range(2)], progress=False)
    rep = qcast.compare(model, qmodel, torch.randn(2, 3, 8, 8), hist_samples=0)
    assert rep.samples == {}
    rep.to_html(tmp_path / "r.html")
    _, parsed = _parse(tmp_path / "r.html")
    assert len(parsed.imgs) == 1

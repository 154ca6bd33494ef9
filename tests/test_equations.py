"""Every equation number cited in adgm.py names the factor that the paper's equation defines.

The table says, for each equation of the paper (Maaløe et al. 2016), what it defines: a piece of
the equation as it stands in the paper's extracted text (checked against that text where the tests have it, so the
table itself is held to the paper), and the ways adgm.py may name it. Every line of adgm.py that
cites `Eq. N` (also `Eq. 3-9, 24`, `Eq. 12-13`) must name, on that line, the factor of each N.
"""
import inspect
import re

import pytest

import adgm

# N: (what Eq. N defines, a piece of its line in the paper's text, names adgm.py may use for it)
EQUATIONS = {
    1: ("the VAE bound", r"\frac{p_{\theta}(x|z)p_{\theta}(z)}{q_{\phi}(z|x)}", ["VAE bound"]),
    2: ("the auxiliary VAE bound", r"\frac{p_{\theta}(a|z,x)p_{\theta}(x|z)p(z)}{q_{\phi}(a|x)q_{\phi}(z|a,x)}",
        ["auxiliary VAE bound"]),
    3: ("p(z)", "p(z)=𝒩(z|0,I)", ["p(z)"]),
    4: ("p(y)", "p(y)=Cat(y|π)", ["p(y)"]),
    5: ("p(a|z,y,x)", r"p_{\theta}(a|z,y,x)=f(a;", ["p(a|z,y,x)", "p(a|z,y[,x])"]),
    6: ("p(x|z,y)", r"p_{\theta}(x|z,y)=f(x;", ["p(x|y,z)", "p(x|[a,]y,z)"]),
    7: ("q(a|x)", r"\mathcal{N}(a|\mu_{\phi}(x)", ["q(a|x)"]),
    8: ("q(y|a,x)", r"\text{Cat}(y|\pi_{\phi}(a,x))", ["q(y|a,x)"]),
    9: ("q(z|a,y,x)", r"\mathcal{N}(z|\mu_{\phi}(a,y,x)", ["q(z|a,y,x)"]),
    10: ("the labeled bound −L(x,y)", r"\mathbb{E}_{q_{\phi}(a,z|x,y)}", ["−L(x,y)", "f(x,y,a,z)"]),
    11: ("the unlabeled bound −U(x)", r"\mathbb{E}_{q_{\phi}(a,y,z|x)}\left[\log", ["−U(x)"]),
    12: ("L_l, the labeled objective with the classification term α", r"\mathcal{L}_{l}(x_{l},y_{l})",
         ["L_l", "α", "alpha"]),
    13: ("the objective J", r"\mathcal{J}=", ["objective J", "J ="]),
    14: ("h_M = NN(x)", r"\mathtt{NN}(x)", ["MLP"]),
    15: ("μ = Linear(h_M)", r"\mu=", ["μ"]),
    16: ("log σ² = Linear(h_M)", r"\log\sigma^{2}=", ["log σ²"]),
    17: ("the Monte-Carlo estimate with y enumerated", r"[f(a,x,y,z)]", ["summed out", "Monte-Carlo", "samples"]),
    18: ("the potential model's bound on log Z", r"\log Z\geq", ["log Z", "potential"]),
    19: ("q(a,z|x) of the L-layer auxiliary VAE", r"=q_{\phi}(a_{1}|x)q_{\phi}(z_{1}|a_{1},x)",
         ["q(a,z|x)", "auxiliary VAE"]),
    20: ("p(x,a,z) of the L-layer auxiliary VAE", r"p_{\theta}(x,a,z)=", ["p(x,a,z)", "auxiliary VAE"]),
    24: ("the ADGM's p(x,a,y,z)", r"p_{\theta}(x|y,z)p_{\theta}(a|x,y,z)p(y)p(z)", ["p(a|z,y,x)", "p(a|z,y[,x])"]),
    25: ("the SDGM's p(x,a,y,z)", r"p_{\theta}(x|a,y,z)p_{\theta}(a|x,y,z)p(y)p(z)", ["p(x|a,y,z)", "p(x|[a,]y,z)"]),
    26: ("−L(x,y), App. B", r"\log p(x,y)", ["−L(x,y)"]),
    27: ("−U(x), App. B", r"\left[f(\cdot)- \log q_{\phi}(y|a,x)\right]", ["−U(x)"]),
}

CITATION = re.compile(r"Eqs?\. (\d+(?:-\d+)?(?:, \d+(?:-\d+)?)*)")


def cited(text):
    """[(line number, line, [N, ...])] for every line of text that cites equations."""
    out = []
    for number, line in enumerate(text.splitlines(), 1):
        eqs = []
        for match in CITATION.finditer(line):
            for part in match.group(1).split(", "):
                lo, _, hi = part.partition("-")
                eqs += range(int(lo), int(hi or lo) + 1)
        if eqs:
            out.append((number, line, eqs))
    return out


def test_the_table_holds_to_the_paper(paper_dir):
    """Each equation's piece stands on the paper's line numbered (N), ignoring white space."""
    paper = "\n".join(p.read_text() for p in sorted(paper_dir.glob("*.txt")))
    numbered = {}
    for line in paper.splitlines():
        match = re.search(r"\((\d+)\)\s*$", line)
        if match:
            numbered.setdefault(int(match.group(1)), re.sub(r"\s", "", line))
    for n, (what, piece, _) in EQUATIONS.items():
        assert n in numbered, f"the paper has no Eq. {n}"
        assert re.sub(r"\s", "", piece) in numbered[n], f"Eq. {n} of the paper is not {what}"


def test_the_parser_reads_ranges_and_lists():
    assert cited("x (Eq. 3-5, 24) and Eq. 7\ny\n(Eqs. 12-13)") == [
        (1, "x (Eq. 3-5, 24) and Eq. 7", [3, 4, 5, 24, 7]), (3, "(Eqs. 12-13)", [12, 13])]


def test_every_equation_cited_in_adgm_py_names_its_factor():
    citations = cited(inspect.getsource(adgm))
    assert len(citations) >= 20  # the models and bounds are cited throughout
    wrong = [f"adgm.py:{number}: Eq. {n} ({EQUATIONS[n][0]}) in {line.strip()!r}"
             for number, line, eqs in citations for n in eqs
             if n not in EQUATIONS or not any(name in line for name in EQUATIONS[n][2])]
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("n, factor", [(7, "q(a|x)"), (8, "q(y|a,x)"), (6, "p(x|y,z)"), (9, "q(z|a,y,x)")])
def test_the_density_factors_are_cited(n, factor):
    """The factors of the semi-supervised models each carry their own equation number."""
    assert any(n in eqs and factor in line for _, line, eqs in cited(inspect.getsource(adgm)))

"""Tests for lorakit.metrics: hand-computed cases, independent re-computations, and references
(sacrebleu called directly, nltk's NIST) rather than numbers copied from a previous run."""

from __future__ import annotations

import itertools
import math
from collections import Counter
from pathlib import Path

import pytest
import sacrebleu
from hypothesis import given, settings
from hypothesis import strategies as st

from lorakit.metrics import (accuracy, bleu, cider, corpus_scores, group_references, nist,
                             nist_info_weights, rouge_l)

E2E_VALID = Path(__file__).resolve().parents[2] / "shared" / "data" / "e2e" / "valid.txt"
METRICS = [bleu, nist, rouge_l, cider, corpus_scores]


def read_e2e_pairs(limit: int) -> list[tuple[str, str]]:
    if not E2E_VALID.exists():
        pytest.skip(f"E2E data not found at {E2E_VALID}")
    pairs = []
    with E2E_VALID.open(encoding="utf-8") as fh:
        for line in itertools.islice(fh, limit):
            source, reference = line.rstrip("\n").split("||")
            pairs.append((source, reference.strip()))
    return pairs


@pytest.fixture(scope="module")
def e2e() -> tuple[list[str], list[list[str]]]:
    """Realistic system outputs: for each MR, one human reference plays the hypothesis and the
    others stay references (MRs with a single reference are dropped)."""
    _, groups = group_references(read_e2e_pairs(400))
    groups = [g for g in groups if len(g) >= 3]
    return [g[0] for g in groups], [g[1:] for g in groups]


# ---------------------------------------------------------------- errors

BAD_INPUTS = [
    ([], [], "no hypotheses"),
    (["a b"], [["a b"], ["c"]], "1 hypotheses but 2 reference lists"),
    (["a b", "c d"], [["a b"], []], r"hypothesis 1 has no references"),
    (["a b"], ["a b"], r"references\[0\] is a string"),
]


@pytest.mark.parametrize("metric", METRICS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("hyps, refs, message", BAD_INPUTS)
def test_bad_input_says_what_is_wrong(metric, hyps, refs, message):
    with pytest.raises(ValueError, match=message):
        metric(hyps, refs)


def test_accuracy():
    assert accuracy([1, 0, 1, 1], [1, 1, 1, 0]) == 0.5
    assert accuracy(["pos", "neg"], ["pos", "neg"]) == 1.0
    with pytest.raises(ValueError, match="3 predictions but 2 labels"):
        accuracy([1, 0, 1], [1, 0])
    with pytest.raises(ValueError, match="no predictions"):
        accuracy([], [])


# ---------------------------------------------------------------- perfect output

def test_perfect_hypotheses(e2e):
    hyps, refs = e2e
    perfect = [r[len(r) // 2] for r in refs]  # each hypothesis equals one of its references
    assert bleu(perfect, refs) == pytest.approx(100.0)
    assert rouge_l(perfect, refs) == pytest.approx(1.0)


# ---------------------------------------------------------------- BLEU

def test_bleu_equals_sacrebleu_on_equal_reference_counts(e2e):
    hyps, refs = e2e
    two = [r[:2] for r in refs]
    streams = [[r[0] for r in two], [r[1] for r in two]]
    assert bleu(hyps, two) == sacrebleu.corpus_bleu(hyps, streams).score
    assert bleu(hyps, two, tokenize="none") == \
        sacrebleu.corpus_bleu(hyps, streams, tokenize="none").score


def test_bleu_variable_reference_counts():
    # Repeating a reference changes neither clipped counts nor the closest length, so padding
    # short lists with copies gives an independent equal-width input for sacrebleu. The short
    # hypotheses make an empty-string pad (wrongly) the closest reference length.
    hyps = ["the cat", "a dog is here now", "birds"]
    refs = [["the cat sat on the mat", "a cat was on the mat", "the cat on a mat"],
            ["a dog is here"],
            ["birds fly over the house", "the birds fly"]]
    padded = [r + [r[0]] * (3 - len(r)) for r in refs]
    streams = [[r[j] for r in padded] for j in range(3)]
    assert bleu(hyps, refs) == pytest.approx(sacrebleu.corpus_bleu(hyps, streams).score)


# ---------------------------------------------------------------- NIST

def test_nist_info_weights_by_hand():
    # references "a b a" and "a c": 5 words; a:3 b:1 c:1; "a b":1 "b a":1 "a c":1; "a b a":1
    w = nist_info_weights([["a b a"], ["a c"]], n=3)
    expected = {("a",): math.log2(5 / 3), ("b",): math.log2(5), ("c",): math.log2(5),
                ("a", "b"): math.log2(3), ("b", "a"): 0.0, ("a", "c"): math.log2(3),
                ("a", "b", "a"): 0.0}
    assert w.keys() == expected.keys()
    for g, v in expected.items():
        assert w[g] == pytest.approx(v), g


def test_nist_brevity_penalty_is_half_at_two_thirds_length():
    # reference "a b c": each unigram has info log2(3); "a b" has info log2(1/1) = 0.
    # Hypothesis "a b": unigram precision log2(3), nothing else; length ratio 2/3 -> penalty 0.5.
    assert nist(["a b"], [["a b c"]]) == pytest.approx(0.5 * math.log2(3))
    assert nist(["a b c"], [["a b c"]]) == pytest.approx(math.log2(3))


def test_nist_several_references_by_hand():
    # refs "a a b", "a c": 5 words; info(a) = log2(5/3), info("a a") = log2(3/1).
    # Hypothesis "a a a": "a" is clipped at its largest count in one reference (2, not 2 + 1),
    # "a a" at 1; "a a a" is unseen. Length 3 >= mean reference length 2.5 -> no penalty.
    expected = 2 / 3 * math.log2(5 / 3) + 1 / 2 * math.log2(3)
    assert nist(["a a a"], [["a a b", "a c"]]) == pytest.approx(expected)
    # The penalty compares with the mean reference length (mteval: total / number of refs):
    # "a" vs refs of 4 and 2 words -> ratio 1 / 3; info(a) = log2(6 / 2).
    beta = math.log(2) / math.log(1.5) ** 2
    expected = math.log2(3) * math.exp(-beta * math.log(1 / 3) ** 2)
    assert nist(["a"], [["a b c d", "a b"]]) == pytest.approx(expected)


def test_nist_matches_nltk_for_single_references(e2e):
    nltk_nist = pytest.importorskip("nltk.translate.nist_score")
    hyps, refs = e2e
    one = [r[:1] for r in refs]
    expected = nltk_nist.corpus_nist([[r.split() for r in rs] for rs in one],
                                     [h.split() for h in hyps], n=5)
    assert nist(hyps, one) == pytest.approx(expected, rel=1e-12)


def test_nist_at_least_nltk_for_equal_length_references():
    # With several references nltk keeps the single best one per item, while mteval (and we)
    # clip each n-gram against its largest count in any reference: ours can only be higher
    # when the reference lengths agree (so both length penalties are equal).
    nltk_nist = pytest.importorskip("nltk.translate.nist_score")
    hyps = ["the red cat sat on a big mat", "a dog runs in the green park today"]
    refs = [["the red cat sat on the mat", "a big cat sat on a mat"],
            ["a dog runs in the park", "the dog ran in a green park"]]
    ours = nist(hyps, refs)
    theirs = nltk_nist.corpus_nist([[r.split() for r in rs] for rs in refs],
                                   [h.split() for h in hyps], n=5)
    assert ours > theirs > 0


# ---------------------------------------------------------------- ROUGE-L

def F(p: float, r: float, b: float = 1.2) -> float:  # noqa: N802  the F-measure, beta = 1.2
    return (1 + b * b) * p * r / (r + b * b * p)

ROUGE_CASES = [
    # LCS("the cat sat on the mat", "the cat on a mat") = "the cat on mat" = 4
    ("the cat sat on the mat", ["the cat on a mat"], F(4 / 6, 4 / 5)),
    # best precision (ref 1) and best recall (ref 2) come from different references
    ("a b", ["a b c d", "a"], 1.0),
    # LCS("a b c d", "d c b a") = 1
    ("a b c d", ["d c b a"], F(1 / 4, 1 / 4)),
    # LCS("x a y b z", "a b q") = 2: P = 2/5 (one ref), R = max(2/3, 1/2) over refs
    ("x a y b z", ["a b q", "a q b q"], F(2 / 5, 2 / 3)),
    ("no overlap", ["at all"], 0.0),
    ("", ["something"], 0.0),
]


@pytest.mark.parametrize("hyp, refs, expected", ROUGE_CASES)
def test_rouge_l_by_hand(hyp, refs, expected):
    assert rouge_l([hyp], [refs]) == pytest.approx(expected)


def test_rouge_l_averages_over_items():
    cases = ROUGE_CASES[:3]
    score = rouge_l([c[0] for c in cases], [c[1] for c in cases])
    assert score == pytest.approx(sum(c[2] for c in cases) / 3)


sentences = st.lists(st.sampled_from("abcde"), min_size=1, max_size=8).map(" ".join)


@settings(max_examples=60, deadline=None)
@given(hyp=sentences, refs=st.lists(sentences, min_size=1, max_size=3), extra=sentences)
def test_rouge_l_more_references_never_lower(hyp, refs, extra):
    base = rouge_l([hyp], [refs])
    assert 0.0 <= base <= 1.0
    assert rouge_l([hyp], [refs + [extra]]) >= base - 1e-12
    assert rouge_l([hyp], [refs + [hyp]]) == pytest.approx(1.0)


# ---------------------------------------------------------------- CIDEr-D

def test_cider_by_hand():
    # N = 2 items, so every n-gram seen in one reference set (or none) weighs tf * log 2.
    # Item 1: hypothesis == reference: cosine 1 for unigrams and bigrams, 0 for orders 3-4
    #   -> 10 * (1 + 1 + 0 + 0) / 4 = 5.
    # Item 2: "c e" vs "c d": unigram cosine 1/2, no shared bigram -> 10 * 0.5 / 4 = 1.25.
    assert cider(["a b", "c e"], [["a b"], ["c d"]]) == pytest.approx((5 + 1.25) / 2)
    # Item 1 becomes "a b x": unigram cosine 2/sqrt(6), bigram cosine 1/sqrt(2), and the
    # length (bigram count, as coco-caption counts it) differs by 1 -> exp(-1 / (2 * 6^2)).
    item1 = 10 * (2 / math.sqrt(6) + 1 / math.sqrt(2)) / 4 * math.exp(-1 / 72)
    assert cider(["a b x", "c e"], [["a b"], ["c d"]]) == pytest.approx((item1 + 1.25) / 2)
    # Clipping: "a a" vs "a" gives min(2w, w) * w / (2w * w) = 1/2 for unigrams, and the
    # bigram "a a" is unmatched; length delta 1 - 0 = 1.
    # coco-caption measures length in bigrams, so with n=1 there is no length penalty at all.
    assert cider(["a b x", "c e"], [["a b"], ["c d"]], n=1) == \
        pytest.approx((10 * 2 / math.sqrt(6) + 10 * 0.5) / 2)
    clipped = 10 * 0.5 / 4 * math.exp(-1 / 72)
    assert cider(["a a", "c d"], [["a"], ["c d"]]) == pytest.approx((clipped + 5) / 2)


def cider_reference(hyps: list[str], refs: list[list[str]], n: int = 4, sigma: float = 6.0):
    """A deliberately plain CIDEr-D: one n-gram order at a time, dense vectors over a
    vocabulary, formulas straight from Vedantam et al. (2015) eq. 3-4 with coco's CIDEr-D
    changes (clipping, length penalty on bigram counts, x10)."""
    def grams(text, k):
        t = text.split()
        return Counter(tuple(t[i:i + k]) for i in range(len(t) - k + 1))

    def bigram_len(text):  # coco's quirk: length counted in bigrams, and only if n >= 2
        return max(len(text.split()) - 1, 0) if n >= 2 else 0

    scores = [[0.0] * len(r) for r in refs]  # per item, per reference: summed over orders
    for k in range(1, n + 1):
        vocab = sorted({g for rs in refs for r in rs for g in grams(r, k)}
                       | {g for h in hyps for g in grams(h, k)})
        df = {g: sum(any(g in grams(r, k) for r in rs) for rs in refs) for g in vocab}
        idf = [math.log(len(hyps)) - math.log(max(1, df[g])) for g in vocab]

        def vector(text):
            c = grams(text, k)
            return [c[g] * w for g, w in zip(vocab, idf)]

        for i, (h, rs) in enumerate(zip(hyps, refs)):
            hv = vector(h)
            for j, r in enumerate(rs):
                rv = vector(r)
                nh = math.sqrt(sum(x * x for x in hv))
                nr = math.sqrt(sum(x * x for x in rv))
                if nh == 0 or nr == 0:
                    continue
                cos = sum(min(a, b) * b for a, b in zip(hv, rv)) / (nh * nr)
                delta = bigram_len(h) - bigram_len(r)
                scores[i][j] += cos * math.exp(-delta * delta / (2 * sigma * sigma))
    per_item = [10 * sum(s) / n / len(s) for s in scores]
    return sum(per_item) / len(per_item)


def test_cider_matches_plain_recomputation(e2e):
    hyps, refs = e2e
    hyps, refs = hyps[:8], [r[:3] for r in refs[:8]]
    assert cider(hyps, refs) == pytest.approx(cider_reference(hyps, refs), rel=1e-10)
    assert cider(hyps, refs, n=2, sigma=3.0) == \
        pytest.approx(cider_reference(hyps, refs, n=2, sigma=3.0), rel=1e-10)


# ---------------------------------------------------------------- several references

def test_adding_a_matching_reference_does_not_lower_scores(e2e):
    # Not a theorem for corpus metrics (BLEU's brevity penalty, NIST's info weights and
    # CIDEr's document frequencies all move when a reference is added), so it is checked on
    # real E2E outputs: giving one item a reference equal to its hypothesis must help there.
    hyps, refs = e2e
    one = [r[:1] for r in refs]
    base = corpus_scores(hyps, one)
    for i in range(0, len(hyps), max(1, len(hyps) // 8)):
        more = [r + [hyps[i]] if j == i else r for j, r in enumerate(one)]
        for name, value in corpus_scores(hyps, more).items():
            assert value >= base[name], (name, i)


def test_corpus_scores_keys_and_values(e2e):
    hyps, refs = e2e[0][:10], e2e[1][:10]
    scores = corpus_scores(hyps, refs)
    assert set(scores) == {"bleu", "nist", "rouge_l", "cider"}
    assert scores["bleu"] == bleu(hyps, refs)
    assert scores["nist"] == nist(hyps, refs)
    assert scores["rouge_l"] == rouge_l(hyps, refs)
    assert scores["cider"] == cider(hyps, refs)


# ---------------------------------------------------------------- grouping

def test_group_references_on_e2e_lines():
    pairs = read_e2e_pairs(60)
    sources, refs = group_references(pairs)
    # In the file the references of one MR sit on consecutive lines, so groupby is an
    # independent way to get the same grouping.
    runs = [(s, [r for _, r in grp]) for s, grp in itertools.groupby(pairs, key=lambda p: p[0])]
    assert sources == [s for s, _ in runs]
    assert refs == [r for _, r in runs]
    assert len(set(sources)) == len(sources)
    assert sources[0] == "name : Alimentum | area : city centre | family friendly : no"
    assert refs[0][0] == ("There is a place in the city centre , Alimentum , that is not "
                          "family - friendly .")
    assert sum(map(len, refs)) == len(pairs)


def test_group_references_non_adjacent_and_empty():
    pairs = [("A", "1"), ("B", "2"), ("A", "3")]
    assert group_references(pairs) == (["A", "B"], [["1", "3"], ["2"]])
    assert group_references([]) == ([], [])

"""Data-to-text metrics over multiple references (E2E NLG challenge), plus accuracy.

The LoRA paper (Hu et al. 2021, §5.5 and Table 3) reports E2E results with the official scripts
of the E2E NLG challenge (tuetschek/e2e-metrics): BLEU and NIST from NIST's mteval-v13a, and
METEOR, ROUGE-L and CIDEr from the MS-COCO caption evaluation code (coco-caption). This module
re-implements those definitions in plain Python so evaluation needs no Perl, no Java and no
network; each function cites the definition it follows and says where it departs from the scripts.

Input convention everywhere: ``hypotheses[i]`` is one system output and ``references[i]`` is the
list of references for that same item (E2E has 1 to 40+ per meaning representation; the count
varies from item to item). Texts are already tokenized E2E-style, so NIST, ROUGE-L and CIDEr
split on whitespace; BLEU goes through sacrebleu and its tokenizer.

METEOR is left out on purpose: METEOR 1.5 (what e2e-metrics runs) is a Java program with
paraphrase tables, and nltk's re-implementation needs the WordNet corpus downloaded at run time.
Neither fits lorakit's "nothing is downloaded at run time" rule, and a METEOR without synonyms
and paraphrases would give numbers that are not comparable with the paper's.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import sacrebleu

__all__ = ["SCALES", "accuracy", "bleu", "cider", "corpus_scores", "group_references", "nist",
           "nist_info_weights", "rouge_l"]

NGram = tuple[str, ...]

# The range of each score as these functions return it (they differ: BLEU is sacrebleu's 0-100,
# ROUGE-L and accuracy are fractions, CIDEr-D is coco-caption's x10); `lorakit eval` writes these
# beside the numbers, so a reader never has to guess.
SCALES = {
    "bleu": "0-100 (higher is better)",
    "nist": "0 and up, no fixed maximum (higher is better; E2E systems score about 8-9)",
    "rouge_l": "0-1 (higher is better)",
    "cider": "0-10 (CIDEr-D, x10 as in coco-caption; higher is better)",
    "accuracy": "0-1 (fraction correct)",
}


def _check(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    """Reject the input shapes that would silently give a wrong corpus score."""
    if len(hypotheses) == 0:
        raise ValueError("no hypotheses: a corpus score needs at least one hypothesis")
    if len(hypotheses) != len(references):
        raise ValueError(f"got {len(hypotheses)} hypotheses but {len(references)} reference "
                         "lists; references[i] must be the list of references for hypotheses[i]")
    for i, (hyp, refs) in enumerate(zip(hypotheses, references)):
        if not isinstance(hyp, str):
            raise ValueError(f"hypotheses[{i}] is {type(hyp).__name__}, expected str")
        if isinstance(refs, str):  # a bare string would be read as a list of characters
            raise ValueError(f"references[{i}] is a string; wrap it in a list: [{refs!r}]")
        if len(refs) == 0:
            raise ValueError(f"hypothesis {i} has no references (references[{i}] is empty)")


def _ngrams(tokens: Sequence[str], n: int) -> Counter[NGram]:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]],
         tokenize: str = "13a") -> float:
    """Corpus BLEU-4 (Papineni et al. 2002) via ``sacrebleu.corpus_bleu``, on the 0-100 scale.

    sacrebleu wants one stream per reference position, all as long as the hypotheses; items with
    fewer references are padded with ``None``, which sacrebleu drops (``''`` would count as a real,
    empty reference and could become the "closest" length in the brevity penalty).
    Differences from e2e-metrics (mteval-v13a): sacrebleu takes the brevity penalty from the
    closest reference length, mteval-v13a from the shortest; tokenization is sacrebleu's.
    """
    _check(hypotheses, references)
    width = max(len(refs) for refs in references)
    streams = [[refs[j] if j < len(refs) else None for refs in references] for j in range(width)]
    # force=True: the input is tokenized on purpose (E2E), so sacrebleu's warning is noise.
    return float(sacrebleu.corpus_bleu(list(hypotheses), streams, tokenize=tokenize,
                                       force=True).score)


def nist_info_weights(references: Sequence[Sequence[str]], n: int = 5) -> dict[NGram, float]:
    """Information weight of every reference n-gram, Doddington (2002) eq. 2.

    ``Info(w1..wk) = log2(count(w1..wk-1) / count(w1..wk))`` with counts summed over every
    reference of every item (as mteval-v13a does); for unigrams the numerator is the total number
    of reference words. Rare continuations of a common prefix carry more information.
    """
    counts: Counter[NGram] = Counter()
    total_words = 0
    for refs in references:
        for ref in refs:
            tokens = ref.split()
            total_words += len(tokens)
            for k in range(1, n + 1):
                counts.update(_ngrams(tokens, k))
    return {g: math.log2((counts[g[:-1]] if len(g) > 1 else total_words) / c)
            for g, c in counts.items()}


def _nist_brevity(ratio: float) -> float:
    """mteval's NIST length penalty ``exp(-beta * log(ratio)^2)`` for ratio < 1.

    beta is fixed so that the penalty is 0.5 when the system output is 2/3 of the average
    reference length (Doddington 2002, §4; ``nist_length_penalty`` in mteval-v13a.pl).
    """
    if ratio >= 1.0:
        return 1.0
    if ratio <= 0.0:
        return 0.0
    beta = -math.log(0.5) / math.log(1.5) ** 2
    return math.exp(-beta * math.log(ratio) ** 2)


def nist(hypotheses: Sequence[str], references: Sequence[Sequence[str]], n: int = 5) -> float:
    """Corpus NIST score (Doddington 2002, eq. 3), following mteval-v13a.pl.

    For each order k: sum of info weights of matched hypothesis k-grams (a k-gram's count is
    clipped at its largest count in any one reference of the item), divided by the number of
    hypothesis k-grams; summed over k = 1..n and multiplied by the length penalty of
    ``total hypothesis words / total average-reference words``.

    Conventions, stated because tools disagree:
    - Items with different numbers of references: each item contributes the mean length of its
      own references. This equals mteval when every item has the same number; e2e-metrics instead
      pads missing references with empty segments, which shortens mteval's average length.
    - nltk's ``corpus_nist`` picks the single best reference per item (matches and length) instead
      of clipping against all references; it agrees with this function for single references.
    """
    _check(hypotheses, references)
    info = nist_info_weights(references, n)
    match_info = [0.0] * (n + 1)
    hyp_ngrams = [0] * (n + 1)
    hyp_words, ref_words = 0, 0.0
    for hyp, refs in zip(hypotheses, references):
        hyp_tokens = hyp.split()
        ref_tokens = [r.split() for r in refs]
        hyp_words += len(hyp_tokens)
        ref_words += sum(len(t) for t in ref_tokens) / len(ref_tokens)
        for k in range(1, n + 1):
            counts = _ngrams(hyp_tokens, k)
            hyp_ngrams[k] += sum(counts.values())
            most: Counter[NGram] = Counter()
            for tokens in ref_tokens:
                most |= _ngrams(tokens, k)  # `|` keeps the larger count of each n-gram
            match_info[k] += sum(info[g] * c for g, c in (counts & most).items())
    score = sum(match_info[k] / max(hyp_ngrams[k], 1) for k in range(1, n + 1))
    return score * _nist_brevity(hyp_words / ref_words if ref_words > 0 else 1.0)


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Longest common subsequence length: the O(len(a)·len(b)) table, one row kept."""
    row = [0] * (len(b) + 1)
    for x in a:
        prev_diag = 0
        for j, y in enumerate(b, start=1):
            prev_diag, row[j] = row[j], (prev_diag + 1 if x == y else max(row[j], row[j - 1]))
    return row[-1]


def rouge_l(hypotheses: Sequence[str], references: Sequence[Sequence[str]],
            beta: float = 1.2) -> float:
    """ROUGE-L (Lin 2004, §3.1) as coco-caption computes it; returns a value on the 0-1 scale.

    Per item: LCS-based precision ``lcs/len(hyp)`` and recall ``lcs/len(ref)`` against each
    reference; the best precision and the best recall are taken separately (they may come from
    different references), combined as ``(1+beta²)PR / (R + beta²P)`` with beta = 1.2 (recall
    weighted higher); the corpus score is the plain mean over items. Tokens are whitespace-split
    (coco splits on single spaces; identical for normalised text). An empty hypothesis scores 0.
    """
    _check(hypotheses, references)
    total = 0.0
    for hyp, refs in zip(hypotheses, references):
        hyp_tokens = hyp.split()
        best_p, best_r = 0.0, 0.0
        for ref in refs:
            ref_tokens = ref.split()
            lcs = _lcs_length(hyp_tokens, ref_tokens)
            if hyp_tokens:
                best_p = max(best_p, lcs / len(hyp_tokens))
            if ref_tokens:
                best_r = max(best_r, lcs / len(ref_tokens))
        if best_p > 0 and best_r > 0:
            total += (1 + beta ** 2) * best_p * best_r / (best_r + beta ** 2 * best_p)
    return total / len(hypotheses)


def cider(hypotheses: Sequence[str], references: Sequence[Sequence[str]], n: int = 4,
          sigma: float = 6.0) -> float:
    """CIDEr-D (Vedantam et al. 2015, §3 and §6.1) as coco-caption's ``CiderD`` computes it.

    Each text becomes, per order k = 1..n, a vector of tf·idf weights, where idf is
    ``log(N) - log(max(1, df))``, N the number of items and df the number of items whose
    reference *set* contains the n-gram (hypotheses never enter df). The similarity of the
    hypothesis to one reference is ``sum_g min(h_g, r_g)·r_g / (|h||r|)`` (the min clips gamed
    repetitions), times the Gaussian length penalty ``exp(-delta²/(2 sigma²))``. Per item: mean
    over k, mean over references, times 10; the corpus score is the mean over items.
    As in coco-caption, the length in delta is the number of bigrams (one less than the number
    of words for non-empty text), so ``n=1`` has no length penalty.
    """
    _check(hypotheses, references)

    def all_ngrams(text: str) -> Counter[NGram]:
        tokens = text.split()
        counts: Counter[NGram] = Counter()
        for k in range(1, n + 1):
            counts.update(_ngrams(tokens, k))
        return counts

    hyp_counts = [all_ngrams(h) for h in hypotheses]
    ref_counts = [[all_ngrams(r) for r in refs] for refs in references]
    doc_freq: Counter[NGram] = Counter()
    for refs in ref_counts:
        doc_freq.update(set().union(*refs))
    log_items = math.log(len(hypotheses))

    def tfidf(counts: Counter[NGram]) -> tuple[list[dict[NGram, float]], list[float], int]:
        vecs: list[dict[NGram, float]] = [{} for _ in range(n)]
        for g, tf in counts.items():
            vecs[len(g) - 1][g] = tf * (log_items - math.log(max(1.0, doc_freq[g])))
        norms = [math.sqrt(sum(w * w for w in v.values())) for v in vecs]
        bigrams = sum(c for g, c in counts.items() if len(g) == 2)
        return vecs, norms, bigrams

    total = 0.0
    for hyp, refs in zip(hyp_counts, ref_counts):
        h_vecs, h_norms, h_len = tfidf(hyp)
        item = 0.0
        for ref in refs:
            r_vecs, r_norms, r_len = tfidf(ref)
            penalty = math.exp(-((h_len - r_len) ** 2) / (2 * sigma ** 2))
            for k in range(n):
                dot = sum(min(w, r_vecs[k].get(g, 0.0)) * r_vecs[k].get(g, 0.0)
                          for g, w in h_vecs[k].items())
                if h_norms[k] > 0 and r_norms[k] > 0:
                    item += dot / (h_norms[k] * r_norms[k]) * penalty
        total += 10.0 * item / n / len(refs)
    return total / len(hypotheses)


def accuracy(predictions: Sequence[object], labels: Sequence[object]) -> float:
    """Fraction of predictions equal to their label (GLUE tasks in the paper's Table 2), 0-1."""
    if len(predictions) != len(labels):
        raise ValueError(f"got {len(predictions)} predictions but {len(labels)} labels")
    if len(predictions) == 0:
        raise ValueError("no predictions: accuracy of an empty set is undefined")
    return sum(bool(p == y) for p, y in zip(predictions, labels)) / len(predictions)


def corpus_scores(hypotheses: Sequence[str],
                  references: Sequence[Sequence[str]]) -> dict[str, float]:
    """BLEU (0-100), NIST, ROUGE-L (0-1) and CIDEr-D for one system: the E2E table minus METEOR."""
    _check(hypotheses, references)
    return {"bleu": bleu(hypotheses, references), "nist": nist(hypotheses, references),
            "rouge_l": rouge_l(hypotheses, references), "cider": cider(hypotheses, references)}


def group_references(pairs: Sequence[tuple[str, str]]) -> tuple[list[str], list[list[str]]]:
    """Group ``(source, reference)`` pairs by source, sources in first-seen order.

    E2E files hold one line per human reference, so a meaning representation with eight
    references appears on eight lines; the metrics need each MR once with all its references.
    Pairs of one source need not be adjacent.
    """
    grouped: dict[str, list[str]] = {}
    for source, reference in pairs:
        grouped.setdefault(source, []).append(reference)
    return list(grouped), list(grouped.values())

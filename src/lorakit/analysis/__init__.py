"""Studies of trained adapters (Hu et al. 2021, §7): subspace similarity between adapters, the
spectrum and ranks of ΔW, and how ΔW relates to the pre-trained W (amplification).

    phi = lorakit.analysis.subspace_similarity(A1, A2)   # (r1, r2): φ(A1, A2, i, j) at [i-1, j-1]
    amp = lorakit.analysis.amplification(W, delta_w)     # Table 7's numbers for one layer
    report = lorakit.analysis.analyze_adapters(["run1/adapter", "run2/adapter"], model=None)
    lorakit.analysis.write_report(report, "out/analysis")  # report.md, report.json, PNGs
"""

from .amplification import amplification
from .delta import AdapterDeltas, AnalysisError, LayerDelta, base_weights, common_layers, read_adapter_deltas
from .report import analyze_adapters, write_report
from .spectrum import effective_rank, numerical_rank, spectrum_summary, stable_rank
from .subspace import chance_similarity, column_subspace_similarity, subspace_similarity

__all__ = [
    "subspace_similarity", "column_subspace_similarity", "chance_similarity", "amplification",
    "effective_rank", "stable_rank", "numerical_rank", "spectrum_summary",
    "LayerDelta", "AdapterDeltas", "AnalysisError", "read_adapter_deltas", "common_layers", "base_weights",
    "analyze_adapters", "write_report",
]

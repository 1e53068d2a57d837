"""How the tests compare numbers: the rule, and the tolerances with their derivations.

CONVENTIONS.md's "Tests that hold on any machine", applied. MKL, oneDNN, ATen and ONNX Runtime pick their kernels from
the CPU they run on (instruction sets, cores, caches) and the thread count, and with the kernel the order of every
float sum: the same test rounds differently on another machine.

Exact (``==``, ``torch.equal``, a hash) only for

- what is discrete and decided with a margin far above rounding: shapes, counts, sparsity patterns and densities,
  the kept attention heads of a structured plan (a choice among a few heads whose saliencies differ by far more than
  rounding: :data:`NEURON_SWAPS`);
- data copied, not computed: a tensor saved and loaded, an initializer and its weight, the weights a stage leaves
  alone, files the project wrote itself on the same machine;
- one computation run twice on one machine (same code, inputs and thread count): same seed, same image; a resumed
  prune; an identity correction; a restarted server.

A tolerance, stated beside the assertion (a short comment, or a name from here whose docstring derives it), for

- every float compared with a stored reference or with another code path's floats (another kernel, batch size, GEMM
  shape, summation order, runtime);
- a discrete result decided by comparing floats with no margin. OBS N:M masks keep, in each group of M weights, the
  largest saliencies, and among the 16k groups of a layer some tie within rounding; a structured prune keeps ~700 of
  1024 FFN neurons greedily. A flip changes the rest of the layer's solve and, through the recalibration, every later
  package (another CPU's kernels flip 27k of tiny-sd3's 5.7M 2:4 mask entries, and once 9 of 717 kept neurons). Such
  results are compared exactly only between code paths whose decisions the test shows to have a margin
  (:data:`MASK_MARGIN`), or between two runs of one computation; against a stored reference, compare what is
  continuous in the weights (:func:`fingerprint_tolerances`), and count the flips where the reference lists them.

Deriving a tolerance (``u = 2**-24``, float32's unit roundoff; :data:`EPS32` ``= 2u``, the spacing of floats at 1):

- a float32 sum or dot product of K terms, in an order the kernel picks: two orders differ by at most about
  ``2 K u sum|terms|`` (Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed., section 4.2), typically by
  ``sqrt(K) u sum|terms|`` (rounding errors of random sign): :func:`sum_rtol`;
- a network of D such layers: their errors add, relative to the output's scale (compare with the largest
  ``|reference|``: :func:`tests.export_helpers.rel_err`), and every layer's gain amplifies those before it;
- a factorisation or solve with condition number ``kappa``: relative error ``~ kappa u`` on top of its inputs' error;
- then a margin (5-10x the estimate or the worst value measured under other kernels), and the tolerance must stay
  below what a real bug gives: measure both where cheap and write them beside the assertion.

Before a stored reference or a new tolerance lands, run its test under a second kernel configuration::

    MKL_ENABLE_INSTRUCTIONS=AVX2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 .venv/bin/python -m pytest <test>

(``MKL_CBWR=COMPATIBLE``, ``ATEN_CPU_CAPABILITY=default`` and ``OMP_NUM_THREADS=1`` change the sums further). ONNX
Runtime has no such switch: its MLAS kernels follow the CPU's cpuid. ``qemu-x86_64 -cpu Haswell`` runs a whole test
process on an emulated AVX2 CPU without AVX-512 (every library then takes its AVX2 kernels; slowly).
"""

from __future__ import annotations

import math

EPS32 = 2.0**-23
"""float32's machine epsilon (``torch.finfo(torch.float32).eps``), twice the unit roundoff."""


def sum_rtol(k: int) -> float:
    """Relative difference of two float32 sums (or dot products) of ``k`` terms added in different orders, worst
    case: each order's error is at most ``(k - 1) u sum|terms|`` (Higham, section 4.2), so the two differ by at most
    ``2 (k - 1) u ~ k * EPS32`` of ``sum|terms|``; of the result itself when the terms share a sign (a mean of
    squares, a Hessian's diagonal)."""
    return max(k - 1, 1) * EPS32


TORCH_PATHS_REL = 1e-5
"""Two float32 torch evaluations of one tiny transformer whose sums are blocked differently: masked dense vs physically
cut (the same nonzero products, GEMMs of other shapes), compared with :func:`tests.export_helpers.rel_err` (largest
difference over the reference's largest entry). Each dot product of K <= 1024 terms is summed in another order,
``sqrt(K) u <= 2e-6`` of its terms typically, over a few blocks of ~10 sequential products. Measured at most 3e-7
(SD3, SD3.5 and Flux.1/Flux.2 tiny models; default and AVX2 kernels); 1e-5 leaves 30x and stays below the
smallest real defect measured: a cut without the ``attn.heads`` fix-up, 6.4e-4."""

ORT_PATHS_REL = 1e-4
"""ONNX Runtime vs torch on the same float32 graph (``export.parity.FP32_TOLERANCE``, the export's own check): other
kernels (MLAS vs MKL/oneDNN), other fusions (attention, layer norm, GELU approximations within float32 rounding).
Measured at most 6e-7 on tiny-sd3 and the tiny factory models (default and AVX2 torch kernels); on an emulated AVX2
CPU (``qemu-x86_64 -cpu Haswell``, where ONNX Runtime takes its AVX2 kernels) its outputs for the exported tiny
transformers were bit-identical to the AVX-512 host's. 1e-4 leaves 150x; a 0.1% perturbation of the reference fails
it (tests/unit/test_onnx_export.py)."""

OV_F32_REL = ORT_PATHS_REL
"""OpenVINO at ``INFERENCE_PRECISION_HINT=f32`` vs torch on the same float32 graph: the same derivation as
:data:`ORT_PATHS_REL` (oneDNN/MLAS kernels of other blocking, fused attention and normalisations, within float32
rounding). Measured at most 4e-7 on the tiny factory transformers and tiny-sd3 (Xeon with AVX-512); 1e-4 leaves 250x.
(An INT4 ``MatMulNBits`` graph is not float32 in OpenVINO either: it rounds the 4-bit GEMMs' activations to INT8, as
ONNX Runtime's ``accuracy_level`` 4 does, and is held to the INT4 export's own criterion,
``export.int4_parity.A8_EFFECT_RANGE``.)"""

BF16_ROUNDING = 2.0**-8
"""bfloat16's relative spacing at 1 (8 significant bits): OpenVINO at ``INFERENCE_PRECISION_HINT=bf16`` rounds each
GEMM's activations and weights to it (products accumulated in float32)."""


def bf16_rel(depth: int) -> float:
    """OpenVINO bf16 vs the float32 torch model (:func:`tests.export_helpers.rel_err`) after ``depth`` GEMMs on the
    longest path: each layer's output carries a relative error of about :data:`BF16_ROUNDING` from its rounded inputs,
    and the layers' errors add, relative to the output's scale. Errors of random sign add like ``sqrt(depth)`` (the
    typical case: measured 1.6e-2 on a 2-block tiny SD3 transformer, depth 18, against ``sqrt(18) 2^-8 = 1.7e-2``);
    the bound is their worst case, ``depth 2^-8`` (7e-2 there, 4.5x the measurement). A graph that ran bf16 at all is
    far above float32 rounding (``2^-12`` is 10x below the measurement and 250x above float32's)."""
    return depth * BF16_ROUNDING


def sd3_gemm_depth(blocks: int) -> int:
    """GEMMs on an SD3 transformer's longest path: the timestep embedder (2), then per block the AdaLN modulation,
    Q/K/V, Q K^T, attention x V, the output projection and the feed-forward's two (7), then the output AdaLN and
    projection (2)."""
    return 2 + 7 * blocks + 2


MASK_MARGIN = 1e-6
"""Masks compared exactly between two code paths on one machine (the solvers against SparseGPT's column loop, with and
without dead inputs, a shared factor or a column range): the fixtures' decisions have a margin. Random relative
perturbations of ``MASK_MARGIN`` (8 u: more than the rounding the paths add) of W and H flip none of the N:M,
unstructured and structured decisions of tests/unit/test_solvers.py and test_solvers_columns.py (10 draws each); 1e-5
flips some. A new fixture whose masks are compared exactly gets the same check."""


PRUNE_ROUNDING_REL_L2 = 1e-3
"""Relative L2 distance (``||W - W_ref|| / ||W_ref||``) between two stage-1 prunes of one layer on different kernels
when every decision came out alike (the same kept heads, neurons and masks); :func:`fingerprint_tolerances` turns it
into tolerances. The calibration's float32 forward passes and Hessian sums round differently (relative ``~1e-6``), and
the OBS solve multiplies that by the condition number of ``H + 1% damping`` (at most ``1 + 100 lambda_max /
mean(lambda)``: Hessians of a few hundred tokens are far from full rank). Measured on tiny-sd3 (``--samples 4 --steps
4 --groups 2``) against the default kernels of a Xeon with AVX-512 (:data:`KERNEL_CONFIGS`): at most 2.9e-4
(structured 0.3); wanda's kept weights are copies and its masks came out bit-identical. 1e-3 leaves 3.5x. A real
change moves more: a timestep weight ``w_max`` of 1.21 instead of 1.2 keeps every decision and moves the structured
output projections' sums of squares by 19x the tolerance."""

PRUNE_FLIPPED_REL_L2 = 0.3
"""The same distance when some decision flipped. Stage 1's decisions compare floats: the N:M masks (per group of M, on
weights the earlier columns updated), the kept FFN neurons (~300 of 1024 removed greedily, rescored after each
removal); near-tied candidates flip under other roundings, and a flip changes the rest of the layer's solve and,
through the recalibration, every later package. Two such prunes are two draws of one chaotic process: 2:4 measured up
to 0.18 (each kernel configuration that changed the sums flipped 22k-27k of its 5.7M mask entries; the solver's own
summation order alone, 0.05); structured 0.3 under ``MKL_CBWR=COMPATIBLE ATEN_CPU_CAPABILITY=default``: 9 of 717 kept
neurons of one FFN swapped, that layer 0.18 away. 0.3 is that spread, not a rounding error: what moves the weights
systematically is still caught (2:4 with a saliency ``w^2/U_ii`` in place of ``w^2/U_ii^2``, half the OBS update, no
update across column blocks, no compensation: sums of squares 9-39x the tolerance on the worst tensor; structured
without compensation 49x; wanda scored with ``||X||^2``: 24x; a damping of 1.1% instead of 1%: 1.2x for 2:4, 3x for
structured), another draw is not (a damping of 1.01%, a ``w_max`` of 1.21). The solver's fine behaviour is tested on
one machine against SparseGPT's column loop (tests/unit/test_solvers.py)."""

NEURON_SWAPS = 0.05
"""Share of an FFN's kept neurons that may differ from a stored reference's (see :data:`PRUNE_FLIPPED_REL_L2`): one
near-tie flip re-ranks the greedy's later choices in that layer, measured 9 of 717 (1.3%); a damping of 1.1% swaps up
to 16 (2.2%), a prune without compensation 30-50 in every FFN (4-7%). Attention heads (a few per block, far apart in
saliency) never changed under any kernel configuration or perturbation tried, not even without compensation: exact."""

KERNEL_CONFIGS = (
    "MKL_ENABLE_INSTRUCTIONS=AVX2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2",
    "MKL_ENABLE_INSTRUCTIONS=AVX2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 OMP_NUM_THREADS=1",
    "MKL_CBWR=COMPATIBLE",
    "MKL_CBWR=COMPATIBLE ATEN_CPU_CAPABILITY=default",
    "ATEN_CPU_CAPABILITY=default",
    "OMP_NUM_THREADS=1",
    "OMP_NUM_THREADS=4",
)
"""The kernel configurations the stage-1 figures above were measured under, each against the default (a 2-core Xeon
with AVX-512, where ``OMP_NUM_THREADS=4`` changed nothing)."""


def fingerprint_tolerances(n: int, sumsq: float, rel_l2: float, sigmas: float = 5.0) -> tuple[float, float]:
    """Tolerances ``(sum, sum of squares)`` for a tensor of ``n`` entries compared with a stored reference through
    its sum and sum of squares (float64), when it may lie ``rel_l2`` away from the reference in relative L2 norm
    (:data:`PRUNE_ROUNDING_REL_L2`, :data:`PRUNE_FLIPPED_REL_L2`) by differences of random sign, as rounding noise
    and near-tie flips are.

    With ``D = W - W_ref``, ``||D|| = rel_l2 ||W_ref||``: ``sum(D)`` is a random walk of n steps of rms
    ``||D|| / sqrt(n)``, so ``~ rel_l2 ||W_ref||``; ``sumsq(W) - sumsq(W_ref) = 2 <W_ref, D> + ||D||^2``, where
    ``<W_ref, D> ~ rel_l2 ||W_ref||^2 / sqrt(n)`` and ``||D||^2`` is negligible for rounding noise (``rel_l2^2``) and
    absent on average between two draws of a chaotic process (their norms agree: ``<W_ref, D> ~ -||D||^2 / 2``).
    Each tolerance is ``sigmas`` times its estimate. A systematic change (another update, damping or calibration)
    is correlated with the weights and moves the sum of squares by ``~ rel_l2 ||W_ref||^2``: ``sqrt(n)`` times more.
    """
    return sigmas * rel_l2 * math.sqrt(sumsq), sigmas * 2.0 * rel_l2 * sumsq / math.sqrt(n)

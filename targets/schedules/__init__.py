"""Schedules for bdp's kernels and for the float operators around them, per target.

Binary kernels
--------------
Each ``bdp.BinaryConv`` PrimFunc carries the attribute ``bdp.kernel`` and its parameters
(``bdp.params``, JSON, also on the popcount block so that it survives fusion). On CPUs the
kernel's Relax op pattern is "output-elementwise fusable": FuseOps fuses the float ops that
follow it (scale, bias, BatchNorm, PReLU, residual add, sign) and the producers of its input
into one PrimFunc, which :func:`float_schedule_pass` recognizes (:func:`bdp_kernel_params`) and
schedules as one kernel: :func:`_absorb_fused` folds the consumers into the output stage and
the producers into the pack stage. On CUDA (and with ``BDP_FLOAT_SCHEDULE=0``)
:func:`schedule_module` schedules each kernel alone before the pipeline and marks it
``tir.is_scheduled`` and opaque. On CPUs the popcount stage is
register-blocked in one of two orientations, picked per layer by :func:`binary_conv_plan`
(``VL`` = packed words per vector register: 8 uint64 on AVX-512, 4 on AVX2, 2 on NEON; twice,
four or eight times that for 32/16/8-bit words):

* **x** (wide outputs): a tile of ``xv`` consecutive output columns (one vector register of
  words, ``xv`` the widest power of two <= VL dividing OW) times ``mt`` output channels
  (unrolled); per tap and channel word: one vector load of packed input (consecutive columns are
  consecutive words thanks to the pad stage's phase split), ``mt`` scalar weight broadcasts and
  ``mt`` XOR + popcount + add.
* **k** (narrow outputs, many channels; needs ``M/group`` % VL == 0): a tile of ``wt`` output
  columns (unrolled) times ``kt`` output channels (``kt / VL`` vector registers); per tap and
  channel word: ``wt`` broadcasts of input words, ``kt / VL`` vector weight loads and
  ``wt * kt / VL`` XOR + popcount + add.

In orientation k the accumulator block is laid out with the output channels innermost (the
vector lanes), so the popcount loop reads and writes it with whole vectors; only its write-back
gathers. Orientation k is taken where an x tile would fill less than half a register.

The accumulators live in a ``local`` cache block placed under the tile, the float epilogue is
inlined into its write-back (``reverse_compute_inline``: no integer tensor reaches memory), the
tile loops are fused with the rows and run in parallel (when the layer is big enough to pay for
a parallel region), the reduction init is decomposed last. The pack stage is a vectorized loop
over columns with the channel bits of a word unrolled (in a register), parallel over rows;
the pad stage is a copy of words. A kernel whose input is a concatenation or a resize read by
nothing else gets its pack stage as a Relax function of its own (op pattern injective, see
:func:`bdp.targets.lower.pack_apart`): FuseOps fuses the resizes and the concatenation into it
(never into a kernel), and :func:`schedule_pack_cpu` unrolls a pixel's words in chunks of bits
that each read one piece of the concatenation, so each copy reads its piece directly; the
float concatenation is never written, only its words. LLVM turns the vector popcount into ``vpopcntq``/``vpopcntd``/
``vpopcntw`` (``icelake-server``), a ``vpshufb`` nibble lookup (``haswell``), or NEON ``cnt`` +
``uaddlp``/``uadalp`` (AArch64).

On CUDA every stage is a flat grid (``blockIdx.x``/``threadIdx.x`` over the fused spatial
loops, columns fastest so warps read consecutive words); each thread of the popcount stage
accumulates a few output channels of one output position in registers (``__popcll``/``__popc``,
see :func:`register_cuda_popcount`).

Float operators
---------------
TVM's default Relax pipeline for CPUs legalizes operators to TOPI compute and schedules nothing:
every loop nest runs serially and unvectorized (``dlight`` has CPU rules for GEMV and row
reductions only). :func:`relax_pipeline` inserts :func:`float_schedule_pass` after legalization
and fusion for CPU targets; it gives every PrimFunc without ``tir.is_scheduled`` a generic,
tuning-free schedule (:func:`schedule_float_cpu`):

* injective producers are inlined into their consumers, except constant padding in front of a
  reduction that reads each input element several times, a conv (kept as a parallel copy, so
  the inner loop has no bounds checks; in front of pooling the copy costs more), producers read
  more than once per output (bilinear resize taps) and producers of a concatenation whose
  pieces cannot be split into a few equal chunks (:func:`_schedule_concat` unrolls those chunks,
  so each copy of the loop body reads one piece and the inlined producer runs vectorized);
* the main reduction block (conv2d, grouped/depthwise conv, conv2d_transpose, matmul, pooling)
  is register-blocked: orientation "x" vectorizes the innermost output axis (one or two
  registers) and unrolls an output axis that the x-dependent operand ignores (conv: output
  channels); strided reads get a phase-split layout so the vector loads stay contiguous (of
  the padding copy, or of a copy of their own where the reduction reads each input element at
  least ``PHASE_SPLIT_MIN_REUSE`` times: not for pooling, whose strided loads cost less).
  Orientation "u", for outputs too narrow for a vector (1x1 convs and depthwise convs at 1/16
  and 1/32 scale), vectorizes that other axis instead: constant operands (weights) are
  re-laid out at compile time (the PrimFunc's parameter changes layout and the Relax call
  sites get permuted constants), others get a copy when cheap next to the work. The
  accumulators stay in registers, elementwise consumers are inlined into their write-back;
* reductions along the contiguous innermost axis (means, softmax, global pooling) are split
  with ``rfactor`` into vector partial sums;
* every other block is parallelized over its outer loops and vectorized innermost.

Loops stay serial below a minimum amount of work (``PARALLEL_MIN_*``): a parallel region costs a
thread wake-up, and far more on a busy machine when a worker has been descheduled.
"""

from __future__ import annotations

from .binary_cpu import binary_conv_plan, binary_word, schedule_binary_cpu, schedule_pack_cpu
from .binary_cuda import register_cuda_popcount, schedule_binary_cuda
from .float_cpu import schedule_float_cpu
from .pipeline import (bdp_kernel_params, float_schedule_pass, fuses_epilogues, relax_pipeline, schedule_binary_conv,
                       schedule_module)
from .tir_util import PARALLEL_MIN_BINARY_MACS, PARALLEL_MIN_ELEMENTS, PARALLEL_MIN_MACS

__all__ = ["binary_conv_plan", "binary_word", "schedule_binary_cpu", "schedule_pack_cpu", "register_cuda_popcount",
           "schedule_binary_cuda", "schedule_float_cpu", "bdp_kernel_params", "float_schedule_pass",
           "fuses_epilogues", "relax_pipeline", "schedule_binary_conv", "schedule_module",
           "PARALLEL_MIN_BINARY_MACS", "PARALLEL_MIN_ELEMENTS", "PARALLEL_MIN_MACS"]

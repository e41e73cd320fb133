"""``@triton.jit`` helper shared by kernels that read bf16 inputs as int32 words of two values
(the selective scan's serial forward, WKV-7's split-K forward).

Importing this module imports Triton (it is only imported by the kernels modules)."""

import triton
import triton.language as tl


@triton.jit
def widen_bf16_words(w):
    """``(lo, hi)`` fp32 of int32 words ``w`` that each hold two bf16 values, the lower index in
    the low half: one shift or mask per value, where widening a bf16 value alone costs a byte
    permute (PRMT) to extract it as well (sm_90a)."""
    return (w << 16).to(tl.float32, bitcast=True), (w & -65536).to(tl.float32, bitcast=True)

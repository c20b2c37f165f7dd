"""Per-kernel vector width: ``wide_vectors()`` lets LLVM use 512-bit vectors in one loop.

LLVM's models of the AVX-512 Intel cores (Skylake-X to Sapphire Rapids, Ice and Rocket
Lake) carry the ``prefer-256-bit`` tuning: its vectorisers plan 8 float32 lanes, not 16,
to spare the clock drops that wide instructions once cost.  For the counter hash of the
stochastic quantizers that halves the throughput of ``vpmulld``, the loop's bottleneck:
on this project's Rocket Lake VM a standalone copy of the QSGD fields loop takes 31 ms at
256 bits and 22 ms at 512 bits for 2**24 float32 (one thread; the bits are the same).

LLVM reads the width per function, from the string attributes ``prefer-vector-width``
and ``min-legal-vector-width`` (``X86TargetMachine::getSubtargetImpl``).  Numba has no
option for them and llvmlite's ``FunctionAttributes`` accepts only its known names, so
this intrinsic adds them to the function being lowered, the caller, and returns nothing.
A process-wide ``-force-vector-width`` would do the same to the user's own Numba code.

Where a CPU has no AVX-512 the registers cap the width and the attributes change
nothing; other targets ignore attributes they do not know.  Call it as the first
statement of the ``@njit`` function whose loop it should widen, the innermost one: the
vectoriser runs on each function before it is inlined into its callers.
"""

from __future__ import annotations

from numba import types
from numba.extending import intrinsic

WIDTH_BITS = 512
_ATTRIBUTES = (
    f'"prefer-vector-width"="{WIDTH_BITS}"',
    f'"min-legal-vector-width"="{WIDTH_BITS}"',
)


@intrinsic
def wide_vectors(typingctx):
    """Mark the calling kernel's function to vectorise ``WIDTH_BITS`` wide (no code)."""

    def codegen(context, builder, signature, args):
        attributes = builder.function.attributes
        for attribute in _ATTRIBUTES:
            # set.add: the class's own add() rejects names outside its fixed list.
            set.add(attributes, attribute)
        return context.get_dummy_value()

    return types.none(), codegen

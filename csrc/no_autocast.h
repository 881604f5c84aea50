// Kernels that call ATen ops inside (at::mm, ...) compute in the dtypes they were given.
// An autocast region around a flipkern op has already chosen the op's input dtypes at the
// op's boundary; it must not also recast the kernel's inner calls (a float32 loss whose
// inner matmuls came back in bf16 would fail, or lose precision silently).
#pragma once
#include <c10/core/impl/LocalDispatchKeySet.h>

namespace flipkern {

struct NoAutocast {
  c10::impl::ExcludeDispatchKeyGuard guard{c10::autocast_dispatch_keyset};
};

}  // namespace flipkern

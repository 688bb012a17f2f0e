// A persistent pool that splits a kernel's row range over threads (the caller thread takes the
// first share). The thread count comes from set_num_threads, else $MLX_ZETA_NUM_THREADS, else
// the number of hardware threads.
#pragma once

#include <cstdint>
#include <functional>

namespace zeta {

int num_threads();
void set_num_threads(int n);  // n >= 1; 0 returns to the default
// Calls fn(begin, end) on disjoint ranges covering [0, n), each a multiple of `align` rows
// (but the last), on up to num_threads() threads; returns when all are done. Exceptions from
// any share are rethrown here.
void parallel_for(int64_t n, int64_t align, const std::function<void(int64_t, int64_t)>& fn);

}  // namespace zeta

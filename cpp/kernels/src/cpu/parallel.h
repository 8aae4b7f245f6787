// A small fork-join pool for the CPU kernels, sized by env FASTLLM_CPU_THREADS (default: all
// cores). Any thread may call parallel_for; calls from inside a task, or while another thread's
// call is running, execute serially in the caller, so the pool never deadlocks or oversubscribes.
#pragma once

#include <cstdint>
#include <functional>

namespace fastllm::kernels::cpu {

// Runs task(i) for every i in [0, count); items are claimed one at a time by the pool threads and
// the caller. Returns after all items ran; the first exception thrown by a task is rethrown.
void parallel_for(int64_t count, const std::function<void(int64_t)>& task);

// Threads parallel_for uses (the caller included).
int pool_size();

}  // namespace fastllm::kernels::cpu

#include "parallel.h"

#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

#include "fastllm/kernels/common.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define FASTLLM_CPU_RELAX() _mm_pause()
#else
#define FASTLLM_CPU_RELAX() std::this_thread::yield()
#endif

namespace fastllm::kernels::cpu {
namespace {

thread_local bool t_inside_task = false;

int configured_threads() {
  if (const char* env = std::getenv("FASTLLM_CPU_THREADS")) {
    const int n = std::atoi(env);
    if (n > 0) return n;
  }
  const unsigned hw = std::thread::hardware_concurrency();
  return hw == 0 ? 1 : static_cast<int>(hw);
}

class Pool {
 public:
  explicit Pool(int size) : size_(size) {
    for (int i = 1; i < size_; ++i) workers_.emplace_back([this] { worker_loop(); });
  }

  ~Pool() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stopping_ = true;
      ++generation_;
    }
    wake_.notify_all();
    for (auto& worker : workers_) worker.join();
  }

  int size() const { return size_; }

  void run(int64_t count, const std::function<void(int64_t)>& task) {
    std::unique_lock<std::mutex> call_lock(call_mutex_, std::try_to_lock);
    if (size_ == 1 || count == 1 || t_inside_task || !call_lock.owns_lock()) {
      run_serial(count, task);
      return;
    }
    {
      std::lock_guard<std::mutex> lock(mutex_);
      task_ = &task;
      count_ = count;
      next_.store(0, std::memory_order_relaxed);
      pending_workers_ = static_cast<int>(workers_.size());
      error_ = nullptr;
      generation_.fetch_add(1, std::memory_order_release);
    }
    wake_.notify_all();
    work();
    std::unique_lock<std::mutex> lock(mutex_);
    done_.wait(lock, [this] { return pending_workers_ == 0; });
    task_ = nullptr;
    if (error_) std::rethrow_exception(error_);
  }

 private:
  static void run_serial(int64_t count, const std::function<void(int64_t)>& task) {
    const bool was_inside = t_inside_task;
    t_inside_task = true;
    try {
      for (int64_t i = 0; i < count; ++i) task(i);
    } catch (...) {
      t_inside_task = was_inside;
      throw;
    }
    t_inside_task = was_inside;
  }

  void work() {
    t_inside_task = true;
    for (;;) {
      const int64_t i = next_.fetch_add(1, std::memory_order_relaxed);
      if (i >= count_) break;
      try {
        (*task_)(i);
      } catch (...) {
        std::lock_guard<std::mutex> lock(mutex_);
        if (!error_) error_ = std::current_exception();
        next_.store(count_, std::memory_order_relaxed);
      }
    }
    t_inside_task = false;
  }

  void worker_loop() {
    uint64_t seen = 0;
    for (;;) {
      // Spin briefly: layers issue kernels back to back, and a sleeping worker costs a wake-up.
      for (int spin = 0; spin < 4000 && generation_.load(std::memory_order_acquire) == seen; ++spin)
        FASTLLM_CPU_RELAX();
      std::unique_lock<std::mutex> lock(mutex_);
      wake_.wait(lock, [&] { return generation_.load(std::memory_order_acquire) != seen; });
      seen = generation_.load(std::memory_order_acquire);
      if (stopping_) return;
      lock.unlock();
      work();
      lock.lock();
      if (--pending_workers_ == 0) done_.notify_one();
    }
  }

  const int size_;
  std::vector<std::thread> workers_;
  std::mutex call_mutex_;
  std::mutex mutex_;
  std::condition_variable wake_;
  std::condition_variable done_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int64_t> next_{0};
  const std::function<void(int64_t)>* task_ = nullptr;
  int64_t count_ = 0;
  int pending_workers_ = 0;
  bool stopping_ = false;
  std::exception_ptr error_;
};

Pool& pool() {
  // Leaked on purpose: joining threads during static destruction at interpreter exit can hang.
  static Pool* instance = new Pool(configured_threads());
  return *instance;
}

}  // namespace

void parallel_for(int64_t count, const std::function<void(int64_t)>& task) {
  if (count <= 0) return;
  pool().run(count, task);
}

int pool_size() { return pool().size(); }

}  // namespace fastllm::kernels::cpu

namespace fastllm::kernels {
int cpu_num_threads() { return cpu::pool_size(); }
}  // namespace fastllm::kernels

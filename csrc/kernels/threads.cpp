#include "threads.h"

#include <algorithm>
#include <condition_variable>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

namespace zeta {
namespace {

int default_threads() {
  const char* env = std::getenv("MLX_ZETA_NUM_THREADS");
  if (env && *env) {
    int n = std::atoi(env);
    if (n >= 1) return n;
  }
  return std::max(1u, std::thread::hardware_concurrency());
}

class Pool {
 public:
  ~Pool() { resize(0); }

  // Runs task(i) for i in [0, count) with the caller running i = 0.
  void run(int count, const std::function<void(int)>& task) {
    std::lock_guard<std::mutex> serial(call_mutex_);
    if (int(workers_.size()) < count - 1) resize(count - 1);
    std::exception_ptr first_error;
    {
      std::unique_lock<std::mutex> lock(mutex_);
      task_ = &task;
      count_ = count;
      pending_ = count - 1;
      error_ = nullptr;
      ++generation_;
    }
    cv_.notify_all();
    try {
      task(0);
    } catch (...) {
      first_error = std::current_exception();
    }
    std::unique_lock<std::mutex> lock(mutex_);
    done_.wait(lock, [&] { return pending_ == 0; });
    task_ = nullptr;
    if (!first_error) first_error = error_;
    if (first_error) std::rethrow_exception(first_error);
  }

  void resize(int n) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_ = true;
    }
    cv_.notify_all();
    for (auto& t : workers_) t.join();
    workers_.clear();
    stop_ = false;
    const uint64_t now = generation_;  // a worker starting late must still see the next job as new
    for (int i = 0; i < n; ++i) workers_.emplace_back([this, i, now] { loop(i + 1, now); });
  }

 private:
  void loop(int index, uint64_t seen) {
    for (;;) {
      const std::function<void(int)>* task;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        cv_.wait(lock, [&] { return stop_ || generation_ != seen; });
        if (stop_) return;
        seen = generation_;
        if (index >= count_) continue;
        task = task_;
      }
      std::exception_ptr err;
      try {
        (*task)(index);
      } catch (...) {
        err = std::current_exception();
      }
      std::lock_guard<std::mutex> lock(mutex_);
      if (err && !error_) error_ = err;
      if (--pending_ == 0) done_.notify_one();
    }
  }

  std::mutex call_mutex_, mutex_;
  std::condition_variable cv_, done_;
  std::vector<std::thread> workers_;
  const std::function<void(int)>* task_ = nullptr;
  std::exception_ptr error_;
  int count_ = 0, pending_ = 0;
  uint64_t generation_ = 0;
  bool stop_ = false;
};

Pool& pool() {
  static Pool* p = new Pool();  // never destroyed: workers may outlive static destruction order
  return *p;
}

int g_threads = 0;

}  // namespace

int num_threads() { return g_threads > 0 ? g_threads : default_threads(); }

void set_num_threads(int n) { g_threads = std::max(0, n); }

void parallel_for(int64_t n, int64_t align, const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  align = std::max<int64_t>(1, align);
  int64_t units = (n + align - 1) / align;
  int count = int(std::min<int64_t>(num_threads(), units));
  if (count <= 1) {
    fn(0, n);
    return;
  }
  pool().run(count, [&](int i) {
    int64_t b = std::min(n, units * i / count * align), e = std::min(n, units * (i + 1) / count * align);
    if (b < e) fn(b, e);
  });
}

}  // namespace zeta

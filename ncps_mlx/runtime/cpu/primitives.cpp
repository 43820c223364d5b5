// The CPU kernels (ltc.c, cfc.c) as MLX primitives: graph nodes with eval_cpu, a vjp for every
// input and a vmap over the batch, so that mx.grad, mx.compile and mx.vmap treat them as any
// other operation. Built at install time by setup.py through CMake (CMakeLists.txt beside this
// file); ncps_mlx/runtime/cpu/__init__.py says what the arrays hold.
//
// One primitive class, SequenceKernel, for the loops (LTC, CfC with a backbone, wired CfC,
// CTRNN, CTGRU) and two per-sequence input terms (an affine input projection, an LTC's sensory
// synapses), forward or backward. The forward node's vjp is a backward node whose outputs are the
// gradients of all its inputs (the parameters' summed over the batch). The backward node has no
// vjp of its own (second derivatives): it raises, it never returns zeros.
//
// eval_cpu runs on the CPU stream's thread (or, for a one-step call at once, the caller's); where
// a batch's work is large enough the loop splits it into one range of rows (LTC) or columns (CfC)
// per core the process may run on, run by worker threads kept for the process (over_batch).

#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstring>
#include <functional>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/map.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/ops.h"
#include "mlx/primitives.h"
#include "mlx/transforms.h"

#include "kernels.h"

namespace mx = mlx::core;
namespace nb = nanobind;
using namespace nb::literals;

namespace {

// Projection is not a loop: a sequence's input projection x W^T + b, (B, T, I) -> (B, T, P)
// or feature-major (T, P, B), in the kernels' BLAS (mlx[cpu]'s reference BLAS is ~3 GFLOP/s).
// Sensory is not a loop either: an LTC's sensory synapses (B, T, I) -> (B, T, 2 S), elementwise
// work that MLX ran as (B, T, I, S) tensors.
enum class Loop : int { LTC = 0, CfC = 1, Wired = 2, CTRNN = 3, CTGRU = 4, Projection = 5, Sensory = 6 };

// What a node computes. ints, by loop: LTC {unfolds, timed, mixed memory, input circuit}; CfC {mode, activation, ff_tanh,
// timed, hidden layers, mixed memory, dropout, input circuit}; Wired {mode, ff_tanh, timed, layers, mixed memory, input circuit}; CTRNN
// {unfolds, timed, global feedback}; CTGRU {timed, mozer, M}; Projection {features first}.
// floats: LTC {epsilon, [forget bias]}; CTRNN {delta_t, clip (0: none)}; CTGRU {clip, ln tau (M),
// decay or 1 / tau (M)}; CfC and Wired {forget bias} with mixed memory.
struct Spec {
  Loop loop;
  bool backward;
  std::vector<int> ints;
  std::vector<float> floats;
  uintptr_t sgemm;

  bool operator==(const Spec& o) const {
    return loop == o.loop && backward == o.backward && ints == o.ints && floats == o.floats && sgemm == o.sgemm;
  }
  bool batch_major() const {
    return loop == Loop::LTC || loop == Loop::CTRNN || loop == Loop::CTGRU || loop == Loop::Sensory ||
           (loop == Loop::Projection && !ints[0]);
  }
  bool timed() const {
    switch (loop) {
      case Loop::CfC: return ints[3] != 0;
      case Loop::Wired: return ints[2] != 0;
      case Loop::CTGRU: return ints[0] != 0;
      case Loop::Projection:
      case Loop::Sensory: return false;
      default: return ints[1] != 0;
    }
  }
  bool pure() const { return (loop == Loop::CfC || loop == Loop::Wired) && ints[0] == 1; }
  bool mixed() const {
    return (loop == Loop::CfC && ints[5] != 0) || (loop == Loop::Wired && ints[4] != 0) ||
           (loop == Loop::LTC && ints[2] != 0);
  }
  // Where mixed memory's arrays (LSTM inputs, initial memory, recurrent weight) start: after an
  // LTC's 7 parameter arrays; after a CfC's hidden layers and pure mode's w_tau, A; after a wired
  // CfC's layers (each its state weight, from layer 1 its input weight and bias, in pure mode
  // w_tau and A).
  int memory_index() const {
    const int p = 2 + timed();
    if (loop == Loop::LTC) return p + 7;
    if (loop == Loop::CfC) return p + 3 + 2 * ints[4] + 2 * pure();
    return p + 3 * ints[3] - 2 + 2 * ints[3] * pure();
  }
  // A CfC's dropout masks (T, hidden layers, units, B), after the first layer's input weight and bias.
  bool dropout() const { return loop == Loop::CfC && ints[6] != 0; }
  int keep_index() const { return memory_index() + 3 * mixed() + 2; }
  // The inputs that carry the batch, and on which axis: LTC's are batch-major (B, T, ...), the
  // CfCs' feature-major (..., B). The rest (parameters) have none.
  int batch_axis(int input) const {
    if (loop == Loop::Projection || loop == Loop::Sensory) return input == 0 ? 0 : -1;
    if (mixed()) {  // the LSTM's inputs (T, 4H, B) and initial memory (H, B); an LTC's batch-major
      const int c = memory_index();
      if (input == c) return loop == Loop::LTC ? 0 : 2;
      if (input == c + 1) return 0;  // initial memory (B, S)
    }
    if (dropout() && input == keep_index()) return 3;
    if (input >= 2 + int(timed())) return -1;
    if (batch_major() || (loop == Loop::CfC && input == 0)) return 0;  // a CfC's x is (B, T, I)
    if (input == 1) return 0;  // the initial state (B, S)
    return input == 0 ? 2 : 1;
  }
};

const int LOOPS = 7;
const char* const NAMES[2][LOOPS] = {
    {"LTCSequence", "CfCSequence", "WiredCfCSequence", "CTRNNSequence", "CTGRUSequence", "InputProjection",
     "LTCSensory"},
    {"LTCSequenceVJP", "CfCSequenceVJP", "WiredCfCSequenceVJP", "CTRNNSequenceVJP", "CTGRUSequenceVJP",
     "InputProjectionVJP", "LTCSensoryVJP"}};
// How often each node has run in this process (for the tests and ``python -m ncps_mlx info``).
std::atomic<long> evaluations[2][LOOPS];

int cores() {
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
  return std::max(1u, std::thread::hardware_concurrency());
}

// Worker threads kept for the life of the process: a split batch wakes them. Starting and
// joining a thread a call cost 0.1 to 1.5 ms on the 2-core VM this was measured on, more than the
// work of a small batch (a one-step call at batch 64 ran 5 to 15 times slower split than not).
class Workers {
 public:
  static Workers& shared() {
    static Workers* workers = new Workers();  // never destroyed: its threads are detached
    return *workers;
  }
  // Runs task(part) for every part in [0, parts): part 0 and any part no worker took on the
  // calling thread. False, having run nothing, where another call has the workers now.
  bool run(int parts, const std::function<void(int)>& task) {
    std::unique_lock<std::mutex> use(use_, std::try_to_lock);
    if (!use) return false;
    {
      std::lock_guard<std::mutex> lock(m_);
      if (pid_ != getpid()) pid_ = getpid(), started_ = 0;  // a forked child has none of its parent's threads
      for (; started_ < parts - 1; ++started_) std::thread(&Workers::serve, this).detach();
      task_ = &task, parts_ = parts, next_ = 1, running_ = 0, ++generation_;
    }
    wake_.notify_all();
    task(0);
    std::unique_lock<std::mutex> lock(m_);
    for (int part; (part = claim()) > 0;) {  // parts no worker has woken for yet
      lock.unlock();
      task(part);
      lock.lock();
      --running_;
    }
    done_.wait(lock, [&] { return running_ == 0; });
    task_ = nullptr, parts_ = 0;
    return true;
  }

 private:
  int claim() {  // under m_: the next part not yet taken, or 0
    if (next_ >= parts_) return 0;
    ++running_;
    return next_++;
  }
  void serve() {
    std::unique_lock<std::mutex> lock(m_);
    for (uint64_t seen = 0;; seen = generation_) {
      wake_.wait(lock, [&] { return generation_ != seen; });
      for (int part; (part = claim()) > 0;) {
        const auto* task = task_;  // fixed until running_ is back to 0
        lock.unlock();
        (*task)(part);
        lock.lock();
        if (--running_ == 0) done_.notify_one();
      }
    }
  }
  std::mutex use_, m_;
  std::condition_variable wake_, done_;
  const std::function<void(int)>* task_ = nullptr;
  uint64_t generation_ = 0;
  int parts_ = 0, next_ = 0, running_ = 0, started_ = 0;
  pid_t pid_ = 0;
};

// Batches split over the cores, on the workers and (where another call had them) on the caller.
std::atomic<long> splits[2];

// Roughly how long a batch row of a node takes, for deciding a split: ns per multiply-add of the
// kernels' products (~10 GFLOP/s a core here), per synapse of an LTC's unfold (a sigmoid and its sums).
constexpr double NS_PER_PRODUCT = 0.1, NS_PER_SYNAPSE = 1.0, BACKWARD = 3.0;
// A batch is split only where its work is at least this long: waking the workers and waiting for
// them costs tens of microseconds, and the parameters' gradients of each part are summed after.
// Measured on the 2-core VM: an LTC's elementwise loop gained from ~0.8 ms (1.35x at batch 32,
// one step); the products' loops, whose products get fewer columns a call split, from ~1.3 ms
// (1.13x at batch 1024, one step; 0.7 to 0.9x at batch 16 x 16 steps and 256 x 1).
constexpr double SPLIT_SYNAPSES_NS = 400e3, SPLIT_PRODUCTS_NS = 1e6;

double elements(const std::vector<mx::array>& in, size_t first, size_t last) {
  double n = 0;
  for (size_t i = first; i < last && i < in.size(); ++i) n += double(in[i].size());
  return n;
}

// call(part, first, last) over the batch in one contiguous range per core, the parts on the
// kept workers (the same ranges whoever runs them, so the same sums); one range where the batch's
// work (batch times row_ns) is under split_ns.
template <class F>
void over_batch(int batch, double row_ns, double split_ns, F&& call) {
  const bool small = batch <= 1 || batch * row_ns < split_ns;  // cores() is a system call: not then
  const int parts = small ? 1 : std::min(batch, cores());
  if (parts == 1) return call(0, 0, batch);
  const std::function<void(int)> task = [&](int p) {
    call(p, int(int64_t(batch) * p / parts), int(int64_t(batch) * (p + 1) / parts));
  };
  const bool on_workers = Workers::shared().run(parts, task);
  if (!on_workers)
    for (int p = 0; p < parts; ++p) task(p);
  ++splits[on_workers ? 0 : 1];
}

std::vector<size_t> range(size_t first, size_t last) {
  std::vector<size_t> r;
  for (size_t i = first; i < last; ++i) r.push_back(i);
  return r;
}

// The parameters' gradients of a backward pass: part 0 adds into the (zeroed) outputs, every
// other part into its own zeroed buffers, added in at the end in part order (deterministic).
struct ParameterGradients {
  std::vector<float*> outputs;
  std::vector<size_t> sizes;
  std::vector<std::vector<std::vector<float>>> parts;

  ParameterGradients(std::vector<mx::array>& outs, size_t first) : ParameterGradients(outs, range(first, outs.size())) {}
  ParameterGradients(std::vector<mx::array>& outs, const std::vector<size_t>& which) {
    for (size_t i : which) {
      outputs.push_back(outs[i].data<float>());
      sizes.push_back(outs[i].size());
      std::memset(outs[i].data<float>(), 0, outs[i].nbytes());
    }
    parts.resize(cores());
  }
  std::vector<float*> of_part(int part) {
    if (part == 0) return outputs;
    auto& own = parts[part];
    own.clear();
    for (size_t s : sizes) own.emplace_back(s, 0.0f);
    std::vector<float*> pointers;
    for (auto& v : own) pointers.push_back(v.data());
    return pointers;
  }
  void sum() {
    for (auto& part : parts)
      for (size_t i = 0; i < part.size(); ++i)
        for (size_t k = 0; k < sizes[i]; ++k) outputs[i][k] += part[i][k];
  }
};

// A part's scratch memory, kept between calls (one slot per part, taken while in use; a call that
// finds its slot taken, by a concurrent one, allocates its own): a fresh allocation each call of
// these sizes (0.1-2 MB) came as fresh pages from the system, ~8% of W6's backward pass in page
// faults.
class Scratch {
 public:
  Scratch(int part, size_t n) {
    if (part < SLOTS && locks()[part].try_lock()) {
      slot_ = part;
      auto& kept = buffers()[part];
      if (kept.size() < n) kept.resize(n);
      data_ = kept.data();
    } else {
      own_.resize(n);
      data_ = own_.data();
    }
  }
  ~Scratch() {
    if (slot_ >= 0) locks()[slot_].unlock();
  }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  float* data() { return data_; }

 private:
  static constexpr int SLOTS = 256;
  static std::mutex* locks() {
    static std::mutex slots[SLOTS];
    return slots;
  }
  static std::vector<float>* buffers() {
    static std::vector<float> slots[SLOTS];
    return slots;
  }
  int slot_ = -1;
  float* data_ = nullptr;
  std::vector<float> own_;
};

const float* ptr(const mx::array& a) { return a.data<float>(); }

// The kernels' sgemm: products with one column in matvec.c, the rest in the BLAS spec names.
sgemm_fn products(const Spec& spec) {
  set_blas(reinterpret_cast<sgemm_fn>(spec.sgemm));
  return small_sgemm;
}
float* ptr(mx::array& a) { return a.data<float>(); }

void ltc_eval(const Spec& spec, std::vector<mx::array>& in, std::vector<mx::array>& out) {
  const int timed = spec.timed(), p = 2 + timed;
  const int B = in[0].shape(0), T = in[0].shape(1), S = in[p].shape(0);
  const bool mixed = spec.mixed();
  const int c = p + 7;                // mixed memory's lstm inputs, initial memory, recurrent weight (transposed)
  const bool input_circuit = spec.ints[3] != 0;
  const int q = c + 3;                // the "input" circuit's sensory sigma, mu, w erev, w, in_w, in_b
  const int n = c + (mixed ? 3 : 0) + (input_circuit ? 6 : 0);  // the forward node's inputs
  ltc_args a{B, T, S, spec.ints[0], spec.floats[0], ptr(in[p]), ptr(in[p + 1]), ptr(in[p + 2]), ptr(in[p + 3]),
             ptr(in[p + 4]), ptr(in[p + 5]), ptr(in[p + 6]), ptr(in[0]), timed ? ptr(in[2]) : nullptr,
             mixed ? ptr(in[c]) : nullptr, mixed ? ptr(in[c + 2]) : nullptr, mixed ? spec.floats[1] : 0.0f,
             input_circuit};
  if (input_circuit) {
    a.s_sigma = ptr(in[q]), a.s_mu = ptr(in[q + 1]), a.s_w_erev = ptr(in[q + 2]), a.s_w = ptr(in[q + 3]);
    a.in_w = ptr(in[q + 4]), a.in_b = ptr(in[q + 5]);
  }
  const double row_ns =
      T * (spec.ints[0] * double(S) * S * NS_PER_SYNAPSE + (mixed ? elements(in, c + 2, c + 3) * NS_PER_PRODUCT : 0));
  if (!spec.backward) {
    float* states = ptr(out[0]);
    ltc_memory memory{mixed ? ptr(in[c + 1]) : nullptr, mixed ? ptr(out.back()) : nullptr};
    over_batch(B, row_ns, SPLIT_SYNAPSES_NS, [&](int part, int first, int last) {
      Scratch scratch(part, (input_circuit ? 14 : mixed ? 10 : 5) * size_t(S));
      ltc_forward(&a, ptr(in[1]), states, &memory, first, last, scratch.data());
    });
    return;
  }
  // then: d states, [memory, d memory]
  const mx::array& d_states = in[n];
  std::vector<size_t> summed = range(p, c);
  if (mixed) summed.push_back(c + 2);
  if (input_circuit)
    for (int i = 0; i < 6; ++i) summed.push_back(q + i);
  ParameterGradients grads(out, summed);
  ltc_memory memory{};
  if (mixed) memory = ltc_memory{ptr(in[c + 1]), const_cast<float*>(ptr(in[n + 1])), ptr(in[n + 2]), ptr(out[c]), ptr(out[c + 1]), nullptr};
  over_batch(B, BACKWARD * row_ns, SPLIT_SYNAPSES_NS, [&](int part, int first, int last) {
    Scratch scratch(part, (size_t(T) * spec.ints[0] + 1 + 9 + (mixed ? size_t(T) + 9 : 0) + (input_circuit ? 8 : 0)) * S);
    auto g = grads.of_part(part);
    ltc_memory own = memory;
    if (mixed) own.d_recurrent_t = g[7];
    if (input_circuit) {
      own.d_s_sigma = g[8], own.d_s_mu = g[9], own.d_s_w_erev = g[10], own.d_s_w = g[11];
      own.d_in_w = g[12], own.d_in_b = g[13];
    }
    ltc_backward(&a, ptr(in[1]), ptr(d_states), ptr(out[0]), ptr(out[1]), timed ? ptr(out[2]) : nullptr, g[0], g[1],
                 g[2], g[3], g[4], g[5], g[6], mixed ? &own : nullptr, first, last, scratch.data());
  });
  grads.sum();
}

// The CfC loops keep states feature-major (S, B); their nodes take the initial state and memory
// batch-major (B, S), as the models hold them (no transpose node a call): transposed here, and
// their gradients back.
std::vector<float> transposed(const float* from, int rows, int cols) {
  std::vector<float> to(size_t(rows) * cols);
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < cols; ++c) to[size_t(c) * rows + r] = from[size_t(r) * cols + c];
  return to;
}
std::vector<float> feature_major(const mx::array& a) { return transposed(ptr(a), a.shape(0), a.shape(1)); }
void batch_major_into(const std::vector<float>& from, mx::array& to) {
  auto t = transposed(from.data(), to.shape(1), to.shape(0));
  std::memcpy(to.data<float>(), t.data(), t.size() * sizeof(float));
}

void cfc_eval(const Spec& spec, std::vector<mx::array>& in, std::vector<mx::array>& out) {
  const int timed = spec.timed(), p = 2 + timed, n_hidden = spec.ints[4];
  const int B = in[0].shape(0), T = in[0].shape(1), I = in[0].shape(2), H = in[p].shape(1), K = in[p + 1].shape(0);
  const int U = in[p].shape(0);
  const int L = n_hidden + 1;
  std::vector<const float*> weights, biases;
  for (int l = 0; l < n_hidden; ++l) {
    weights.push_back(ptr(in[p + 3 + 2 * l]));
    biases.push_back(ptr(in[p + 4 + 2 * l]));
  }
  const int q = p + 3 + 2 * n_hidden;  // pure mode's w_tau, A
  const int c = q + (spec.pure() ? 2 : 0);  // mixed memory's lstm inputs, initial memory, recurrent weight
  const bool mixed = spec.mixed();
  const int f = c + (mixed ? 3 : 0);  // the first layer's input weight and bias
  cfc_args a{B, T, H, U, L, spec.ints[0], spec.ints[1], spec.ints[2], K, I, ptr(in[0]), ptr(in[f]), ptr(in[f + 1]),
             timed ? ptr(in[2]) : nullptr,
             ptr(in[p]), weights.data(), biases.data(), ptr(in[p + 1]), ptr(in[p + 2]),
             spec.pure() ? ptr(in[q]) : nullptr, spec.pure() ? ptr(in[q + 1]) : nullptr,
             lstm_args{mixed ? ptr(in[c]) : nullptr, mixed ? ptr(in[c + 2]) : nullptr, mixed ? spec.floats[0] : 0.0f},
             products(spec), spec.dropout() ? ptr(in[f + 2]) : nullptr, spec.ints[7]};
  const int n = f + 2 + spec.dropout();  // the forward node's inputs
  const size_t extra = mixed ? (spec.ints[7] ? 6 : 5) * size_t(H) : 0;
  const double row_ns = T * NS_PER_PRODUCT * (elements(in, p, p + 3 + 2 * n_hidden) + elements(in, f, f + 1) +
                                              (mixed ? elements(in, c + 2, c + 3) : 0));
  const auto initial = feature_major(in[1]);
  const auto initial_c = mixed ? feature_major(in[c + 1]) : std::vector<float>();
  if (!spec.backward) {
    cfc_memory memory{mixed ? initial_c.data() : nullptr, mixed ? ptr(out.back()) : nullptr};
    over_batch(B, row_ns, SPLIT_PRODUCTS_NS, [&](int part, int first, int last) {
      Scratch scratch(part, (H + 2 * U + K + extra) * (last - first));
      cfc_forward(&a, initial.data(), ptr(out[0]), &memory, first, last, scratch.data());
    });
    return;
  }
  // then: states, d states, [memory, d memory]
  const int m = n + 2;
  std::vector<size_t> summed = range(p, c);
  if (mixed) summed.push_back(c + 2);
  summed.push_back(f);
  summed.push_back(f + 1);
  ParameterGradients grads(out, summed);
  std::vector<float> d_initial(in[1].size()), d_initial_c(mixed ? in[c + 1].size() : 0);
  cfc_memory memory{};
  if (mixed) memory = cfc_memory{initial_c.data(), const_cast<float*>(ptr(in[m])), ptr(in[m + 1]), ptr(out[c]), d_initial_c.data(), nullptr};
  over_batch(B, BACKWARD * row_ns, SPLIT_PRODUCTS_NS, [&](int part, int first, int last) {
    Scratch scratch(part, (2 * H + (2 * L + 1) * U + 2 * K + 1 + (mixed ? 8 * size_t(H) : 0) +
                           (spec.dropout() ? size_t(L - 1) * U : 0) + (spec.ints[7] ? size_t(H) : 0)) * (last - first));
    // state weight, head weight, head bias, per hidden layer w, b, [lstm recurrent], input weight, input bias
    auto g = grads.of_part(part);
    std::vector<float*> d_weights, d_biases;
    for (int l = 0; l < n_hidden; ++l) {
      d_weights.push_back(g[3 + 2 * l]);
      d_biases.push_back(g[4 + 2 * l]);
    }
    cfc_memory own = memory;
    if (mixed) own.d_recurrent = g[g.size() - 3];
    cfc_backward(&a, initial.data(), ptr(in[n]), ptr(in[n + 1]), ptr(out[0]), g[g.size() - 2], g.back(), d_initial.data(),
                 timed ? ptr(out[2]) : nullptr, g[0], d_weights.data(), d_biases.data(), g[1], g[2],
                 spec.pure() ? g[q - p] : nullptr, spec.pure() ? g[q - p + 1] : nullptr,
                 spec.dropout() ? ptr(out[f + 2]) : nullptr, mixed ? &own : nullptr, first, last, scratch.data());
  });
  grads.sum();
  batch_major_into(d_initial, out[1]);
  if (mixed) batch_major_into(d_initial_c, out[c + 1]);
}

void wired_eval(const Spec& spec, std::vector<mx::array>& in, std::vector<mx::array>& out) {
  const int timed = spec.timed(), p = 2 + timed, layers = spec.ints[3], pure = spec.pure();
  const int T = in[0].shape(0), B = in[0].shape(2);
  std::vector<int32_t> sizes, heads;
  std::vector<const float*> input_weights, biases, state_weights, w_tau, A;
  std::vector<int> index;  // per layer, the input index of its state weight
  int k = p;
  for (int l = 0; l < layers; ++l) {
    index.push_back(k);
    state_weights.push_back(ptr(in[k]));
    heads.push_back(in[k].shape(0));
    sizes.push_back(in[k].shape(1));
    ++k;
    input_weights.push_back(l > 0 ? ptr(in[k]) : nullptr);
    biases.push_back(l > 0 ? ptr(in[k + 1]) : nullptr);
    k += l > 0 ? 2 : 0;
    w_tau.push_back(pure ? ptr(in[k]) : nullptr);
    A.push_back(pure ? ptr(in[k + 1]) : nullptr);
    k += pure ? 2 : 0;
  }
  const bool mixed = spec.mixed(), input_circuit = spec.ints[5] != 0;
  const int c = k;  // mixed memory's lstm inputs, initial memory, recurrent weight
  const int q = c + 3;  // the "input" circuit's layer-0 input weight (K_0, S) and bias
  if (input_circuit) input_weights[0] = ptr(in[q]), biases[0] = ptr(in[q + 1]);
  const int n = c + (mixed ? 3 : 0) + (input_circuit ? 2 : 0);  // the forward node's inputs
  int S = 0, sum_k = 0, max_k = 0;
  for (int l = 0; l < layers; ++l) {
    S += sizes[l];
    sum_k += heads[l];
    max_k = std::max(max_k, heads[l]);
  }
  wired_args a{B, T, layers, spec.ints[0], spec.ints[1], sizes.data(), heads.data(), ptr(in[0]),
               timed ? ptr(in[2]) : nullptr, input_weights.data(), biases.data(), state_weights.data(), w_tau.data(),
               A.data(),
               lstm_args{mixed ? ptr(in[c]) : nullptr, mixed ? ptr(in[c + 2]) : nullptr, mixed ? spec.floats[0] : 0.0f},
               products(spec), input_circuit};
  const size_t extra = mixed ? (input_circuit ? 6 : 5) * size_t(S) : 0;
  const double row_ns = T * NS_PER_PRODUCT * (elements(in, p, c) + (mixed ? elements(in, c + 2, c + 3) : 0) +
                                              (input_circuit ? elements(in, q, q + 1) : 0));
  const auto initial = feature_major(in[1]);
  const auto initial_c = mixed ? feature_major(in[c + 1]) : std::vector<float>();
  if (!spec.backward) {
    cfc_memory memory{mixed ? initial_c.data() : nullptr, mixed ? ptr(out.back()) : nullptr};
    over_batch(B, row_ns, SPLIT_PRODUCTS_NS, [&](int part, int first, int last) {
      Scratch scratch(part, (S + max_k + extra) * (last - first));
      wired_cfc_forward(&a, initial.data(), ptr(out[0]), &memory, first, last, scratch.data());
    });
    return;
  }
  // then: states, d states, [memory, d memory]
  const int m = n + 2;
  std::vector<size_t> summed = range(p, c);
  if (mixed) summed.push_back(c + 2);
  if (input_circuit) summed.push_back(q), summed.push_back(q + 1);
  ParameterGradients grads(out, summed);
  std::vector<float> d_initial(in[1].size()), d_initial_c(mixed ? in[c + 1].size() : 0);
  cfc_memory memory{};
  if (mixed) memory = cfc_memory{initial_c.data(), const_cast<float*>(ptr(in[m])), ptr(in[m + 1]), ptr(out[c]), d_initial_c.data(), nullptr};
  over_batch(B, BACKWARD * row_ns, SPLIT_PRODUCTS_NS, [&](int part, int first, int last) {
    Scratch scratch(part, (4 * S + sum_k + max_k + 1 + (mixed ? (input_circuit ? 9 : 8) * size_t(S) : 0)) * (last - first));
    auto g = grads.of_part(part);
    cfc_memory own = memory;
    if (mixed) own.d_recurrent = g[c - p];
    std::vector<float*> d_input_weights, d_biases, d_state_weights, d_w_tau, d_A;
    for (int l = 0; l < layers; ++l) {
      float** at = g.data() + (index[l] - p);  // state weight, [input weight, bias], [w_tau, A]
      const int own = l > 0 ? 2 : 0;
      d_state_weights.push_back(at[0]);
      d_input_weights.push_back(l > 0 ? at[1] : nullptr);
      d_biases.push_back(l > 0 ? at[2] : nullptr);
      d_w_tau.push_back(pure ? at[1 + own] : nullptr);
      d_A.push_back(pure ? at[2 + own] : nullptr);
    }
    if (input_circuit) d_input_weights[0] = g[c - p + 1], d_biases[0] = g[c - p + 2];
    wired_cfc_backward(&a, initial.data(), ptr(in[n]), ptr(in[n + 1]), ptr(out[0]), d_initial.data(),
                       timed ? ptr(out[2]) : nullptr, d_input_weights.data(), d_biases.data(), d_state_weights.data(),
                       d_w_tau.data(), d_A.data(), mixed ? &own : nullptr, first, last, scratch.data());
  });
  grads.sum();
  batch_major_into(d_initial, out[1]);
  if (mixed) batch_major_into(d_initial_c, out[c + 1]);
}

void ctrnn_eval(const Spec& spec, std::vector<mx::array>& in, std::vector<mx::array>& out) {
  const int timed = spec.timed(), p = 2 + timed, feedback = spec.ints[2];
  const int B = in[0].shape(0), T = in[0].shape(1), U = in[0].shape(2), K = spec.ints[0];
  ctrnn_args a{B, T, U, K, spec.floats[0], spec.floats[1], ptr(in[0]), timed ? ptr(in[2]) : nullptr,
               feedback ? ptr(in[p]) : nullptr, ptr(in[p + feedback]), products(spec)};
  const int n = p + feedback + 1;
  const double row_ns = T * K * elements(in, p, n) * NS_PER_PRODUCT;
  if (!spec.backward) {
    over_batch(B, row_ns, SPLIT_PRODUCTS_NS, [&](int part, int first, int last) {
      Scratch scratch(part, 3 * size_t(U) * (last - first));
      ctrnn_forward(&a, ptr(in[1]), ptr(out[0]), first, last, scratch.data());
    });
    return;
  }
  ParameterGradients grads(out, p);
  float d_recurrent_unused = 0.0f;
  over_batch(B, BACKWARD * row_ns, SPLIT_PRODUCTS_NS, [&](int part, int first, int last) {
    Scratch scratch(part, size_t(3 * K + 5) * U * (last - first));
    auto g = grads.of_part(part);
    ctrnn_backward(&a, ptr(in[1]), ptr(in[n]), ptr(in[n + 1]), ptr(out[0]), ptr(out[1]), timed ? ptr(out[2]) : nullptr,
                   feedback ? g[0] : &d_recurrent_unused, g[feedback], first, last, scratch.data());
  });
  grads.sum();
}

void ctgru_eval(const Spec& spec, std::vector<mx::array>& in, std::vector<mx::array>& out) {
  const int timed = spec.timed(), p = 2 + timed, M = spec.ints[2];
  const int B = in[0].shape(0), T = in[0].shape(1), U = in[p + 1].shape(0);
  ctgru_args a{B, T, U, M, spec.ints[1], spec.floats[0], spec.floats.data() + 1, spec.floats.data() + 1 + M,
               ptr(in[0]), timed ? ptr(in[2]) : nullptr, ptr(in[p]), ptr(in[p + 1]),
               products(spec)};
  const size_t UM = size_t(U) * M;
  const double row_ns = T * elements(in, p, p + 2) * NS_PER_PRODUCT;
  if (!spec.backward) {
    over_batch(B, row_ns, SPLIT_PRODUCTS_NS, [&](int part, int first, int last) {
      Scratch scratch(part, (7 * UM + 3 * U) * (last - first));
      ctgru_forward(&a, ptr(in[1]), ptr(out[0]), ptr(out[1]), first, last, scratch.data());
    });
    return;
  }
  const int n = p + 2;  // then states, d states, d outputs
  ParameterGradients grads(out, p);
  over_batch(B, BACKWARD * row_ns, SPLIT_PRODUCTS_NS, [&](int part, int first, int last) {
    Scratch scratch(part, (10 * UM + 6 * U) * (last - first));
    auto g = grads.of_part(part);
    ctgru_backward(&a, ptr(in[1]), ptr(in[n]), ptr(in[n + 2]), ptr(in[n + 1]), ptr(out[0]), ptr(out[1]),
                   timed ? ptr(out[2]) : nullptr, g[0], g[1], first, last, scratch.data());
  });
  grads.sum();
}

enum { ROW_MAJOR = 101, NO_TRANS = 111, TRANS = 112 };

// Feature-major, step t's (P, B) block is W (P, I) x_t^T, x_t the (B, I) rows of x at t (row
// stride T I): one product a step, no copy of x; the steps split over the cores. Batch-major,
// one product over the B T rows, the rows split.
void projection_eval(const Spec& spec, std::vector<mx::array>& in, std::vector<mx::array>& out) {
  const int B = in[0].shape(0), T = in[0].shape(1), I = in[0].shape(2), P = in[1].shape(0);
  const bool features_first = spec.ints[0];
  auto sgemm = products(spec);
  const float *x = ptr(in[0]), *w = ptr(in[1]), *bias = ptr(in[2]);
  const int count = features_first ? T : B * T;
  const double row_ns = double(P) * I * (features_first ? B : 1) * NS_PER_PRODUCT;
  if (!spec.backward) {
    float* y = ptr(out[0]);
    over_batch(count, row_ns, SPLIT_PRODUCTS_NS, [&](int, int first, int last) {
      if (last <= first) return;
      if (features_first) {
        for (int t = first; t < last; ++t) {
          float* yt = y + int64_t(t) * P * B;
          for (int p = 0; p < P; ++p) std::fill(yt + int64_t(p) * B, yt + int64_t(p + 1) * B, bias[p]);
          if (B > 0 && I > 0) sgemm(ROW_MAJOR, NO_TRANS, TRANS, P, B, I, 1.0f, w, I, x + int64_t(t) * I, T * I, 1.0f, yt, B);
        }
      } else {
        float* rows = y + int64_t(first) * P;
        for (int r = 0; r < last - first; ++r) std::copy(bias, bias + P, rows + int64_t(r) * P);
        if (P > 0 && I > 0) sgemm(ROW_MAJOR, NO_TRANS, TRANS, last - first, P, I, 1.0f, x + int64_t(first) * I, I, w, I, 1.0f, rows, P);
      }
    });
    return;
  }
  const float* dy = ptr(in[3]);
  float* dx = ptr(out[0]);
  ParameterGradients grads(out, 1);
  over_batch(count, BACKWARD * row_ns, SPLIT_PRODUCTS_NS, [&](int part, int first, int last) {
    if (last <= first) return;
    auto g = grads.of_part(part);  // d weight (P, I), d bias (P,)
    if (features_first) {
      for (int t = first; t < last; ++t) {
        const float* dyt = dy + int64_t(t) * P * B;
        if (B > 0 && I > 0) {
          sgemm(ROW_MAJOR, TRANS, NO_TRANS, B, I, P, 1.0f, dyt, B, w, I, 0.0f, dx + int64_t(t) * I, T * I);
          sgemm(ROW_MAJOR, NO_TRANS, NO_TRANS, P, I, B, 1.0f, dyt, B, x + int64_t(t) * I, T * I, 1.0f, g[0], I);
        }
        for (int p = 0; p < P; ++p)
          for (int b = 0; b < B; ++b) g[1][p] += dyt[int64_t(p) * B + b];
      }
    } else {
      const int R = last - first;
      const float* dyr = dy + int64_t(first) * P;
      if (I > 0) {
        sgemm(ROW_MAJOR, NO_TRANS, NO_TRANS, R, I, P, 1.0f, dyr, P, w, I, 0.0f, dx + int64_t(first) * I, I);
        sgemm(ROW_MAJOR, TRANS, NO_TRANS, P, I, R, 1.0f, dyr, P, x + int64_t(first) * I, I, 1.0f, g[0], I);
      }
      for (int r = 0; r < R; ++r)
        for (int p = 0; p < P; ++p) g[1][p] += dyr[int64_t(r) * P + p];
    }
  });
  grads.sum();
}

void sensory_eval(const Spec& spec, std::vector<mx::array>& in, std::vector<mx::array>& out) {
  const int I = in[0].shape(2), S = in[1].shape(1), rows = in[0].shape(0) * in[0].shape(1);
  const float *x = ptr(in[0]), *sigma = ptr(in[1]), *mu = ptr(in[2]), *w_erev = ptr(in[3]), *w = ptr(in[4]);
  if (!spec.backward) {
    over_batch(rows, I * S * NS_PER_SYNAPSE, SPLIT_SYNAPSES_NS, [&](int, int first, int last) { ltc_sensory_forward(I, S, x, sigma, mu, w_erev, w, ptr(out[0]), first, last); });
    return;
  }
  ParameterGradients grads(out, 1);
  over_batch(rows, BACKWARD * I * S * NS_PER_SYNAPSE, SPLIT_SYNAPSES_NS, [&](int part, int first, int last) {
    std::vector<float> along(S);
    auto g = grads.of_part(part);  // d sigma, d mu, d w erev, d w
    ltc_sensory_backward(I, S, x, sigma, mu, w_erev, w, ptr(in[5]), ptr(out[0]), g[0], g[1], g[2], g[3], first, last,
                         along.data());
  });
  grads.sum();
}

// What a node of spec computes, from its inputs into its (allocated) outputs.
void run(const Spec& spec, std::vector<mx::array>& in, std::vector<mx::array>& out) {
  ++evaluations[spec.backward][int(spec.loop)];
  switch (spec.loop) {
    case Loop::LTC: return ltc_eval(spec, in, out);
    case Loop::CfC: return cfc_eval(spec, in, out);
    case Loop::Wired: return wired_eval(spec, in, out);
    case Loop::CTRNN: return ctrnn_eval(spec, in, out);
    case Loop::CTGRU: return ctgru_eval(spec, in, out);
    case Loop::Projection: return projection_eval(spec, in, out);
    case Loop::Sensory: return sensory_eval(spec, in, out);
  }
}

std::vector<mx::array> sequence(const Spec& spec, std::vector<mx::array> inputs, bool now = false);

class SequenceKernel : public mx::Primitive {
 public:
  SequenceKernel(mx::Stream stream, Spec spec) : mx::Primitive(stream), spec_(std::move(spec)) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    for (auto& o : outputs) o.set_data(mx::allocator::malloc(o.nbytes()));
    auto& encoder = mx::cpu::get_command_encoder(stream());
    for (auto& i : inputs) encoder.set_input_array(i);
    for (auto& o : outputs) encoder.set_output_array(o);
    encoder.dispatch([spec = spec_, in = inputs, out = outputs]() mutable { run(spec, in, out); });
  }

  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("[ncps_mlx] the CPU kernels run on the CPU device only");
  }

  std::vector<mx::array> vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
                             const std::vector<int>& argnums, const std::vector<mx::array>& outputs) override {
    if (spec_.backward)
      throw std::invalid_argument(
          "[ncps_mlx] the CPU kernels have no second derivatives: set NCPS_MLX_RUNTIME=mlx to differentiate twice");
    Spec backward = spec_;
    backward.backward = true;
    std::vector<mx::array> inputs = primals;
    if (spec_.loop == Loop::CTGRU) {  // outputs (B, T, U) and states: both have cotangents
      inputs.push_back(outputs[1]);
      inputs.push_back(cotangents[1]);
    } else if (spec_.loop != Loop::LTC && spec_.loop != Loop::Projection && spec_.loop != Loop::Sensory) {
      inputs.push_back(outputs[0]);
    }
    inputs.push_back(cotangents[0]);
    if (spec_.mixed()) {
      inputs.push_back(outputs.back());
      inputs.push_back(cotangents.back());
    }
    auto grads = sequence(backward, inputs);
    std::vector<mx::array> picked;
    for (int i : argnums) picked.push_back(grads[i]);
    return picked;
  }

  // The vmapped axis joins the batch: (V, B) -> V B rows. Parameters cannot be vmapped (each
  // instance would need its own), nor can a backward node (its parameters' gradients are sums
  // over the batch).
  std::pair<std::vector<mx::array>, std::vector<int>> vmap(const std::vector<mx::array>& inputs,
                                                           const std::vector<int>& axes) override {
    if (spec_.backward) throw std::invalid_argument("[ncps_mlx] the CPU kernels' backward pass cannot be vmapped");
    int V = -1;
    for (size_t i = 0; i < inputs.size(); ++i) {
      if (axes[i] < 0) continue;
      if (spec_.batch_axis(i) < 0)
        throw std::invalid_argument(
            "[ncps_mlx] mx.vmap over a model's parameters is not supported by the CPU kernels: set "
            "NCPS_MLX_RUNTIME=mlx");
      V = inputs[i].shape(axes[i]);
    }
    std::vector<mx::array> merged;
    for (size_t i = 0; i < inputs.size(); ++i) {
      int b = spec_.batch_axis(i);
      if (b < 0) {
        merged.push_back(inputs[i]);
        continue;
      }
      mx::array x = axes[i] >= 0 ? mx::moveaxis(inputs[i], axes[i], b, stream())
                                 : mx::repeat(mx::expand_dims(inputs[i], b, stream()), V, b, stream());
      auto shape = x.shape();
      shape[b] *= shape[b + 1];
      shape.erase(shape.begin() + b + 1);
      merged.push_back(mx::reshape(x, shape, stream()));
    }
    auto outs = sequence(spec_, merged);
    int b = spec_.batch_major() ? 0 : 2;  // the outputs' batch axis
    std::vector<mx::array> split;
    std::vector<int> out_axes;
    for (auto& o : outs) {
      auto shape = o.shape();
      shape[b] /= V;
      shape.insert(shape.begin() + b, V);
      split.push_back(mx::reshape(o, shape, stream()));
      out_axes.push_back(b);
    }
    return {split, out_axes};
  }

  const char* name() const override {
    return NAMES[spec_.backward][int(spec_.loop)];
  }

  bool is_equivalent(const mx::Primitive& other) const override {
    return spec_ == static_cast<const SequenceKernel&>(other).spec_;
  }

 private:
  Spec spec_;
};

void require(bool condition, const std::string& message) {
  if (!condition) throw std::invalid_argument("[ncps_mlx] " + message);
}

// Whether arrays can be read now, on the calling thread: each computed float32, and none a tracer
// of mx.grad, mx.vmap or mx.compile (those need a node in their graph).
bool ready(const std::vector<mx::array>& arrays) {
  for (auto& a : arrays)
    if (!a.is_available() || a.is_tracer() || a.dtype() != mx::float32) return false;
  return true;
}

// Whether a is computed, not traced, row-contiguous and nonzero everywhere: a one-step call's
// mask that keeps every row, read at once (false sends the call the masked way).
bool nonzero_now(const mx::array& a) {
  if (!a.is_available() || a.is_tracer() || !a.flags().row_contiguous) return false;
  auto nonzero = [&](const auto* p) { return std::all_of(p, p + a.size(), [](auto v) { return v != 0; }); };
  if (a.dtype() == mx::bool_) return nonzero(a.data<bool>());
  if (a.dtype() == mx::uint8) return nonzero(a.data<uint8_t>());
  if (a.dtype() == mx::int32) return nonzero(a.data<int32_t>());
  if (a.dtype() == mx::int64) return nonzero(a.data<int64_t>());
  if (a.dtype() == mx::float32) return nonzero(a.data<float>());
  return false;
}

mx::array allocated(const mx::Shape& shape) {
  size_t n = 1;
  for (auto d : shape) n *= size_t(d);
  return mx::array(mx::allocator::malloc(n * sizeof(float)), shape, mx::float32);
}

// Whether arrays can be made ready() here: those not yet computed are evaluated (one scheduled
// graph), unless one is a tracer (a transformation's graph must keep it) or MLX refuses.
bool settle(const std::vector<mx::array>& arrays) {
  std::vector<mx::array> pending;
  for (auto& a : arrays) {
    if (a.is_tracer() || a.dtype() != mx::float32) return false;
    if (!a.is_available()) pending.push_back(a);
  }
  if (pending.empty()) return true;
  try {
    mx::eval(pending);
  } catch (const std::exception&) {
    return false;
  }
  return true;
}

// A ready() array row-contiguous: itself, or copied now (a strided view, e.g. of a NumPy slice).
mx::array contiguous_now(const mx::array& a) {
  if (a.flags().row_contiguous) return a;
  mx::array out = allocated(a.shape());
  const float* from = a.data<float>();
  float* to = out.data<float>();
  const int n = a.ndim();
  for (size_t i = 0; i < out.size(); ++i) {
    int64_t offset = 0;
    size_t rest = i;
    for (int d = n - 1; d >= 0; --d) {
      offset += int64_t(rest % a.shape(d)) * a.strides()[d];
      rest /= a.shape(d);
    }
    to[i] = from[offset];
  }
  return out;
}

// The node for spec over inputs, made row-contiguous float32 on the CPU: -> its outputs. With
// now and every input ready(), no node: the outputs computed at once on this thread, as the node
// would compute them (a one-step call's graph costs MLX's scheduling a node, several times the
// kernel's work).
std::vector<mx::array> sequence(const Spec& spec, std::vector<mx::array> inputs, bool now) {
  auto stream = mx::default_stream(mx::Device(mx::Device::cpu));
  const bool at_once = now && ready(inputs);
  for (auto& a : inputs) {
    require(a.dtype() == mx::float32, "the CPU kernels take float32 arrays");
    if (at_once) {
      a = contiguous_now(a);
      continue;
    }
    // An evaluated row-contiguous array (a weight, kept between calls) is read as it is: a
    // Contiguous node for each would be a scheduled task of every call.
    // So is an output of these kernels' own nodes (each a fresh row-contiguous array).
    const bool ours = a.has_primitive() && dynamic_cast<const SequenceKernel*>(&a.primitive()) != nullptr;
    if (!ours && !(a.is_available() && a.flags().row_contiguous)) a = mx::contiguous(a, false, stream);
  }
  const int timed = spec.timed(), p = 2 + timed;
  require(inputs.size() > size_t(p), "too few arrays");
  const auto& x = inputs[0];
  std::vector<mx::Shape> shapes;
  if (spec.backward) {
    const Loop l = spec.loop;
    const bool one = l == Loop::LTC || l == Loop::Projection || l == Loop::Sensory;  // only a cotangent
    size_t n = inputs.size() - (one ? 1 : l == Loop::CTGRU ? 3 : 2) - 2 * spec.mixed();
    for (size_t i = 0; i < n; ++i) shapes.push_back(inputs[i].shape());
  } else if (spec.loop == Loop::LTC) {
    require(x.ndim() == 3 && inputs.size() == size_t(p + 7 + 3 * spec.mixed() + 6 * (spec.ints[3] != 0)),
            "LTC: inputs (B, T, 2S) and 9 or 10 arrays, with mixed memory 3 more, in its input circuit 6 more");
    shapes.push_back({x.shape(0), x.shape(1), inputs[p].shape(0)});
    if (spec.mixed()) shapes.push_back(shapes.back());
  } else if (spec.loop == Loop::CfC) {
    require(x.ndim() == 3, "CfC: x (B, T, I)");
    const int B = x.shape(0), T = x.shape(1), H = inputs[p].shape(1);
    require(!spec.dropout() || (int(inputs.size()) == spec.keep_index() + 1 &&
                                inputs.back().shape() == mx::Shape{T, spec.ints[4], inputs[p].shape(0), B}),
            "CfC: dropout masks (T, hidden layers, units, B) last");
    shapes.push_back({T, H, B});
    if (spec.mixed()) shapes.push_back({T, H, B});
  } else if (spec.loop == Loop::Sensory) {
    require(x.ndim() == 3 && inputs.size() == 5 && inputs[1].ndim() == 2 && inputs[1].shape(0) == x.shape(2),
            "sensory synapses: x (B, T, I), sigma, mu, w erev, w (I, S)");
    shapes.push_back({x.shape(0), x.shape(1), 2 * inputs[1].shape(1)});
  } else if (spec.loop == Loop::Projection) {
    require(x.ndim() == 3 && inputs.size() == 3 && inputs[1].ndim() == 2 && inputs[1].shape(1) == x.shape(2) &&
                inputs[2].ndim() == 1 && inputs[2].shape(0) == inputs[1].shape(0),
            "projection: x (B, T, I), weight (P, I), bias (P,)");
    const int B = x.shape(0), T = x.shape(1), P = inputs[1].shape(0);
    shapes.push_back(spec.ints[0] ? mx::Shape{T, P, B} : mx::Shape{B, T, P});
  } else if (spec.loop == Loop::CTGRU) {
    const int M = spec.ints[2];
    require(x.ndim() == 3 && inputs.size() == size_t(p + 2) && spec.floats.size() == size_t(1 + 2 * M),
            "CTGRU: inputs (B, T, 2 U M + U) and 4 or 5 arrays");
    const int U = inputs[p + 1].shape(0);
    shapes.push_back({x.shape(0), x.shape(1), U});
    shapes.push_back({x.shape(0), x.shape(1), U * M});
  } else if (spec.loop == Loop::CTRNN) {
    require(x.ndim() == 3 && inputs.size() == size_t(p + 1 + spec.ints[2]), "CTRNN: inputs (B, T, U) and 3 to 5 arrays");
    shapes.push_back(x.shape());
  } else {
    require(x.ndim() == 3 && inputs[1].ndim() == 2 && inputs[1].shape(0) == x.shape(2),
            "wired CfC: inputs (T, K, B), initial (B, S)");
    shapes.push_back({x.shape(0), inputs[1].shape(1), x.shape(2)});
    if (spec.mixed()) shapes.push_back(shapes.back());
  }
  if (at_once) {
    std::vector<mx::array> outputs;
    for (auto& shape : shapes) outputs.push_back(allocated(shape));
    run(spec, inputs, outputs);
    return outputs;
  }
  std::vector<mx::Dtype> dtypes(shapes.size(), mx::float32);
  return mx::array::make_arrays(shapes, dtypes, std::make_shared<SequenceKernel>(stream, spec), inputs);
}

// Dropout masks for a CfC's backbone: each element 0, or 1 / kept with probability kept, from a
// counter-based hash (splitmix64) of a 64-bit key and the element's index, so that one key (drawn
// with mx.random, which mx.random.seed repeats) gives one set of masks. MLX's bernoulli cost
// more than a training forward pass's loop here.
class DropoutMasks : public mx::Primitive {
 public:
  DropoutMasks(mx::Stream stream, float kept) : mx::Primitive(stream), kept_(kept) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    auto& out = outputs[0];
    out.set_data(mx::allocator::malloc(out.nbytes()));
    auto& encoder = mx::cpu::get_command_encoder(stream());
    encoder.set_input_array(inputs[0]);
    encoder.set_output_array(out);
    encoder.dispatch([key = inputs[0], out = out, kept = kept_]() mutable {
      const uint32_t* k = key.data<uint32_t>();
      const uint64_t seed = (uint64_t(k[0]) << 32) | k[1];
      const uint64_t threshold = uint64_t(double(kept) * double(1 << 24));  // 24-bit uniforms, exact in float32
      const float scale = 1.0f / kept;
      float* masks = out.data<float>();
      for (size_t i = 0; i < out.size(); ++i) {
        uint64_t z = seed + (uint64_t(i) + 1) * 0x9E3779B97F4A7C15ull;
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        z ^= z >> 31;
        masks[i] = (z >> 40) < threshold ? scale : 0.0f;
      }
    });
  }
  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("[ncps_mlx] the CPU kernels run on the CPU device only");
  }
  std::vector<mx::array> vjp(const std::vector<mx::array>&, const std::vector<mx::array>&, const std::vector<int>&,
                             const std::vector<mx::array>&) override {
    throw std::invalid_argument("[ncps_mlx] dropout masks have no gradient with respect to their key");
  }
  std::pair<std::vector<mx::array>, std::vector<int>> vmap(const std::vector<mx::array>&,
                                                           const std::vector<int>&) override {
    throw std::invalid_argument("[ncps_mlx] dropout masks are drawn once a call, outside mx.vmap");
  }
  const char* name() const override { return "DropoutMasks"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    return kept_ == static_cast<const DropoutMasks&>(other).kept_;
  }

 private:
  float kept_;
};

// A one-step call's results as the model returns them, computed now from ready() arrays (an MLX
// slice, transpose or reshape would each be a node to schedule): features [start, stop) of a
// (T, S, B) (feature_major) or (B, T, S) array, as (B, T, n), or the last step's (B, n) without
// keep_time; each feature times scale and plus shift where given (an LTC's mapping: two
// roundings, as MLX's x * w + b). None where an array is not ready().
std::optional<mx::array> features_now(const mx::array& a, bool feature_major, int start, int stop, bool keep_time,
                                      std::optional<mx::array> scale, std::optional<mx::array> shift) {
  std::vector<mx::array> arrays{a};
  if (scale) arrays.push_back(*scale);
  if (shift) arrays.push_back(*shift);
  if (!ready(arrays)) return std::nullopt;
  require(a.ndim() == 3 && 0 <= start && start <= stop && stop <= a.shape(feature_major ? 1 : 2),
          "features_now: a (T, S, B) or (B, T, S) array and a range of its S features");
  const int n = stop - start;
  require((!scale || scale->size() == size_t(n)) && (!shift || shift->size() == size_t(n)),
          "features_now: scale and shift of one entry per feature");
  const int T = a.shape(feature_major ? 0 : 1), B = a.shape(feature_major ? 2 : 0), S = a.shape(feature_major ? 1 : 2);
  const int first = keep_time ? 0 : T - 1, steps = T - first;
  mx::array out = allocated(keep_time ? mx::Shape{B, T, n} : mx::Shape{B, n});
  const mx::array values = contiguous_now(a);
  const float *v = ptr(values), *w = scale ? ptr(*scale) : nullptr, *c = shift ? ptr(*shift) : nullptr;
  float* o = out.data<float>();
  for (int b = 0; b < B; ++b)
    for (int t = 0; t < steps; ++t)
      for (int j = 0; j < n; ++j) {
        const int k = start + j;
        float x = feature_major ? v[(int64_t(first + t) * S + k) * B + b] : v[(int64_t(b) * T + first + t) * S + k];
        if (w) x = x * w[j];
        if (c) x = x + c[j];
        o[(int64_t(b) * steps + t) * n + j] = x;
      }
  return out;
}

// a as a ready array of shape: one value filled, or as many values copied in order (any ready a
// for an empty shape); None where a is not ready() or has another count.
std::optional<mx::array> filled_now(const mx::array& a, std::vector<int> shape) {
  if (!ready({a})) return std::nullopt;
  mx::array out = allocated(mx::Shape(shape.begin(), shape.end()));
  if (out.size() == 0)
    return out;
  const mx::array values = contiguous_now(a);
  if (a.size() == 1)
    std::fill(out.data<float>(), out.data<float>() + out.size(), ptr(values)[0]);
  else if (a.size() == out.size())
    std::copy(ptr(values), ptr(values) + a.size(), out.data<float>());
  else
    return std::nullopt;
  return out;
}

using Host = nb::ndarray<float, nb::ndim<1>, nb::c_contig, nb::device::cpu>;

}  // namespace

NB_MODULE(_kernels, m) {
  m.doc() = "The CPU kernels of ncps_mlx as MLX primitives (see ncps_mlx/runtime/cpu/__init__.py).";
  m.attr("mlx_version") = MLX_BUILT_VERSION;
  // Whether this build and the running mlx agree on what an array is (nanobind's ABI): a
  // mismatch raises TypeError here, where the status can say so, not in a model.
  m.def("probe", [](const mx::array& a) { return a.size(); });
  m.def("splits", []() {
    return std::map<std::string, long>{{"workers", splits[0].load()}, {"caller", splits[1].load()}};
  });
  m.def("evaluations", []() {
    std::map<std::string, long> counts;
    for (int b = 0; b < 2; ++b)
      for (int l = 0; l < LOOPS; ++l) counts[NAMES[b][l]] = evaluations[b][l].load();
    return counts;
  });
  m.def(
      "ltc_sequence",
      [](std::vector<mx::array> arrays, int unfolds, float epsilon, bool timed, bool mixed, float forget_bias,
         bool input_circuit, bool now) {
        require(!input_circuit || mixed, "the input circuit is mixed memory's");
        return sequence(Spec{Loop::LTC, false, {unfolds, timed, mixed, input_circuit}, {epsilon, forget_bias}, 0},
                        std::move(arrays), now);
      },
      "arrays"_a, "unfolds"_a, "epsilon"_a, "timed"_a, "mixed"_a, "forget_bias"_a, "input_circuit"_a, "now"_a = false);
  m.def(
      "cfc_sequence",
      [](std::vector<mx::array> arrays, int mode, int activation, bool ff_tanh, bool timed, int hidden_layers,
         bool mixed, float forget_bias, bool dropout, bool input_circuit, uintptr_t sgemm, bool now) {
        require(!input_circuit || mixed, "the input circuit is mixed memory's");
        return sequence(Spec{Loop::CfC, false, {mode, activation, ff_tanh, timed, hidden_layers, mixed, dropout, input_circuit},
                             mixed ? std::vector<float>{forget_bias} : std::vector<float>{}, sgemm},
                        std::move(arrays), now);
      },
      "arrays"_a, "mode"_a, "activation"_a, "ff_tanh"_a, "timed"_a, "hidden_layers"_a, "mixed"_a,
      "forget_bias"_a, "dropout"_a, "input_circuit"_a, "sgemm"_a, "now"_a = false);
  m.def(
      "wired_cfc_sequence",
      [](std::vector<mx::array> arrays, int mode, bool ff_tanh, bool timed, int layers, bool mixed, float forget_bias,
         bool input_circuit, uintptr_t sgemm, bool now) {
        require(!input_circuit || mixed, "the input circuit is mixed memory's");
        return sequence(Spec{Loop::Wired, false, {mode, ff_tanh, timed, layers, mixed, input_circuit},
                             mixed ? std::vector<float>{forget_bias} : std::vector<float>{}, sgemm},
                        std::move(arrays), now);
      },
      "arrays"_a, "mode"_a, "ff_tanh"_a, "timed"_a, "layers"_a, "mixed"_a, "forget_bias"_a, "input_circuit"_a, "sgemm"_a, "now"_a = false);
  m.def(
      "ctrnn_sequence",
      [](std::vector<mx::array> arrays, int unfolds, float delta_t, float clip, bool timed, bool feedback,
         uintptr_t sgemm, bool now) {
        return sequence(Spec{Loop::CTRNN, false, {unfolds, timed, feedback}, {delta_t, clip}, sgemm},
                        std::move(arrays), now)[0];
      },
      "arrays"_a, "unfolds"_a, "delta_t"_a, "clip"_a, "timed"_a, "feedback"_a, "sgemm"_a, "now"_a = false);
  m.def(
      "ctgru_sequence",
      [](std::vector<mx::array> arrays, int scales, bool mozer, float clip, std::vector<float> ln_tau,
         std::vector<float> decay, bool timed, uintptr_t sgemm, bool now) {
        std::vector<float> floats{clip};
        floats.insert(floats.end(), ln_tau.begin(), ln_tau.end());
        floats.insert(floats.end(), decay.begin(), decay.end());
        return sequence(Spec{Loop::CTGRU, false, {timed, mozer, scales}, floats, sgemm}, std::move(arrays), now);
      },
      "arrays"_a, "scales"_a, "mozer"_a, "clip"_a, "ln_tau"_a, "decay"_a, "timed"_a, "sgemm"_a, "now"_a = false);
  m.def(
      "input_projection",
      [](mx::array x, mx::array weight, mx::array bias, bool features_first, uintptr_t sgemm, bool now) {
        return sequence(Spec{Loop::Projection, false, {features_first}, {}, sgemm}, {x, weight, bias}, now)[0];
      },
      "x"_a, "weight"_a, "bias"_a, "features_first"_a, "sgemm"_a, "now"_a = false);
  m.def(
      "dropout_masks",
      [](mx::array key, std::vector<int> shape, float kept) {
        require(key.dtype() == mx::uint32 && key.size() == 2, "dropout masks: a key of two uint32");
        require(kept > 0.0f && kept <= 1.0f, "dropout masks: kept in (0, 1]");
        auto stream = mx::default_stream(mx::Device(mx::Device::cpu));
        return mx::array(mx::Shape(shape.begin(), shape.end()), mx::float32,
                         std::make_shared<DropoutMasks>(stream, kept), {mx::contiguous(key, false, stream)});
      },
      "key"_a, "shape"_a, "kept"_a);
  m.def(
      "ltc_sensory",
      [](mx::array x, mx::array sigma, mx::array mu, mx::array w_erev, mx::array w, bool now) {
        return sequence(Spec{Loop::Sensory, false, {}, {}, 0}, {x, sigma, mu, w_erev, w}, now)[0];
      },
      "x"_a, "sigma"_a, "mu"_a, "w_erev"_a, "w"_a, "now"_a = false);
  m.def("ready", &ready, "arrays"_a);
  m.def("nonzero_now", &nonzero_now, "a"_a);
  m.def("settle", &settle, "arrays"_a);
  m.def("features_now", &features_now, "a"_a, "feature_major"_a, "start"_a, "stop"_a, "keep_time"_a,
        "scale"_a = nb::none(), "shift"_a = nb::none());
  m.def("filled_now", &filled_now, "a"_a, "shape"_a);
  // rational.h's functions as the kernels compute them, for the tests' sweep over the float range.
  m.def("tanh_array", [](Host x, Host y) { tanh_array(x.data(), y.data(), std::min(x.shape(0), y.shape(0))); });
  m.def("sigmoid_array", [](Host x, Host y) { sigmoid_array(x.data(), y.data(), std::min(x.shape(0), y.shape(0))); });
}

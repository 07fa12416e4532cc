// The votes-sized passes of a convolutional capsule layer's EM routing on the CPU, each vote
// computed where it is used instead of stored and read back:
//     V_gcn = P_gn W_nc - center_gc,
// the 4x4 pose P of child n of group g (an image's output position) times the 4x4 weight W
// of child n (kernel offset, input type) for parent type c, relative to the mean of the
// parent's votes (capsules/em_routing.py routes votes in that frame). A vote costs 64
// multiply-adds on inputs 16 times smaller than the votes: the passes are compute-bound
// instead of bound by the memory traffic of votes-sized tensors. capsules/em_kernels.py
// builds this file and wraps the ops.
//
// Layouts (float32): patches [G, N, 16], kernel [N, C, 16], center [G, C, 16], per-route
// tensors [G, C, N], per-parent vectors [G, C, 32] (16 for V, then 16 for V^2). The passes
// work on 16 children at a time, one per lane of a 64-byte vector (GCC/Clang vector
// extensions: AVX-512 where the CPU has it, narrower vectors otherwise).

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "absl/strings/str_cat.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/util/work_sharder.h"

namespace capsules {
namespace {

using ::tensorflow::DEVICE_CPU;
using ::tensorflow::OpKernel;
using ::tensorflow::OpKernelContext;
using ::tensorflow::Tensor;
using ::tensorflow::TensorShape;
using ::tensorflow::shape_inference::InferenceContext;

typedef float Lanes __attribute__((vector_size(64)));
constexpr int64_t kLanes = 16;  // children per vector
constexpr int kPose = 16;

inline Lanes Load(const float* from) {
  Lanes lanes;
  std::memcpy(&lanes, from, sizeof(lanes));
  return lanes;
}

inline void Store(const Lanes& lanes, float* to) { std::memcpy(to, &lanes, sizeof(lanes)); }

inline void Add(const Lanes& lanes, float* to) { Store(Load(to) + lanes, to); }

// sums[h] = the sum of the lanes of lanes[h], for 16 vectors: a tree of shuffles and adds
// that halves the vectors and the lanes each vector holds per sum at every level (four
// levels, 15 adds), instead of 16 chains of 15 dependent scalar additions.
inline Lanes SumEach(const Lanes lanes[kLanes]) {
  Lanes halves[8], quarters[4], eighths[2];
  for (int m = 0; m < 8; ++m)  // lanes 0-7: 8 partial sums of lanes[2m], 8-15: of lanes[2m+1]
    halves[m] = __builtin_shufflevector(lanes[2 * m], lanes[2 * m + 1], 0, 1, 2, 3, 4, 5, 6, 7,
                                        16, 17, 18, 19, 20, 21, 22, 23) +
                __builtin_shufflevector(lanes[2 * m], lanes[2 * m + 1], 8, 9, 10, 11, 12, 13, 14,
                                        15, 24, 25, 26, 27, 28, 29, 30, 31);
  for (int m = 0; m < 4; ++m)  // 4 partial sums each of lanes[4m .. 4m+3]
    quarters[m] = __builtin_shufflevector(halves[2 * m], halves[2 * m + 1], 0, 1, 2, 3, 8, 9, 10,
                                          11, 16, 17, 18, 19, 24, 25, 26, 27) +
                  __builtin_shufflevector(halves[2 * m], halves[2 * m + 1], 4, 5, 6, 7, 12, 13,
                                          14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  for (int m = 0; m < 2; ++m)  // 2 partial sums each of lanes[8m .. 8m+7]
    eighths[m] = __builtin_shufflevector(quarters[2 * m], quarters[2 * m + 1], 0, 1, 4, 5, 8, 9,
                                         12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
                 __builtin_shufflevector(quarters[2 * m], quarters[2 * m + 1], 2, 3, 6, 7, 10, 11,
                                         14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
  return __builtin_shufflevector(eighths[0], eighths[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20,
                                 22, 24, 26, 28, 30) +
         __builtin_shufflevector(eighths[0], eighths[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21,
                                 23, 25, 27, 29, 31);
}

// The votes of one call: its three inputs checked, the kernel laid out per parent with the
// children along the lanes, [C, 16, padded N], zero past N. One per Compute call (an
// OpKernel may run on several threads at once).
class Votes {
 public:
  bool Read(OpKernelContext* context) {
    const Tensor& patches = context->input(0);
    const Tensor& kernel = context->input(1);
    const Tensor& center = context->input(2);
    if (patches.dims() != 3 || patches.dim_size(2) != kPose || kernel.dims() != 3 ||
        kernel.dim_size(2) != kPose || kernel.dim_size(0) != patches.dim_size(1) ||
        center.dims() != 3 || center.dim_size(0) != patches.dim_size(0) ||
        center.dim_size(1) != kernel.dim_size(1) || center.dim_size(2) != kPose) {
      context->SetStatus(absl::InvalidArgumentError(absl::StrCat(
          "votes of patches ", patches.shape().DebugString(), ", kernel ",
          kernel.shape().DebugString(), " and center ", center.shape().DebugString(),
          ": expected [G, N, 16], [N, C, 16] and [G, C, 16]")));
      return false;
    }
    groups = patches.dim_size(0);
    children = patches.dim_size(1);
    parents = kernel.dim_size(1);
    padded = (children + kLanes - 1) / kLanes * kLanes;
    patches_ = patches.flat<float>().data();
    center_ = center.flat<float>().data();
    const float* w = kernel.flat<float>().data();
    kernel_.assign(parents * kPose * padded, 0.0f);
    for (int64_t n = 0; n < children; ++n)
      for (int64_t c = 0; c < parents; ++c)
        for (int h = 0; h < kPose; ++h)
          kernel_[(c * kPose + h) * padded + n] = w[(n * parents + c) * kPose + h];
    return true;
  }

  // rows [16, padded N]: group g's patches with the children along the lanes, zero past N.
  void Transpose(int64_t g, float* rows) const {
    std::fill(rows, rows + kPose * padded, 0.0f);
    for (int64_t n = 0; n < children; ++n)
      for (int h = 0; h < kPose; ++h)
        rows[h * padded + n] = patches_[(g * children + n) * kPose + h];
  }

  // [16, padded N] of parent c.
  const float* kernel(int64_t c) const { return kernel_.data() + c * kPose * padded; }
  const float* center(int64_t g, int64_t c) const {
    return center_ + (g * parents + c) * kPose;
  }

  // The 16 components of the votes of the 16 children from `offset`, vote[i*4+j] =
  // sum_t P[i*4+t] W[t*4+j] - center[i*4+j]; the kernel's 16 vectors are loaded once.
  void Vote(const float* rows, const float* kernel, const float* center, int64_t offset,
            Lanes vote[kPose]) const {
    Lanes w[kPose];
    for (int q = 0; q < kPose; ++q) w[q] = Load(kernel + q * padded + offset);
    for (int i = 0; i < 4; ++i) {
      Lanes p[4];
      for (int t = 0; t < 4; ++t) p[t] = Load(rows + (i * 4 + t) * padded + offset);
      for (int j = 0; j < 4; ++j)
        vote[i * 4 + j] = p[0] * w[j] + p[1] * w[4 + j] + p[2] * w[8 + j] + p[3] * w[12 + j] -
                          center[i * 4 + j];
    }
  }

  // Copies the N values of one route row into `padded` lanes, zero past N.
  void Pad(const float* row, float* to) const {
    std::copy(row, row + children, to);
    std::fill(to + children, to + padded, 0.0f);
  }

  int64_t groups = 0, children = 0, parents = 0, padded = 0;

 private:
  const float* patches_ = nullptr;
  const float* center_ = nullptr;
  std::vector<float> kernel_;
};

bool CheckInput(OpKernelContext* context, int index, const char* name,
                const TensorShape& expected) {
  const Tensor& input = context->input(index);
  if (input.shape() == expected) return true;
  context->SetStatus(absl::InvalidArgumentError(absl::StrCat(
      name, " of shape ", input.shape().DebugString(), ", expected ", expected.DebugString())));
  return false;
}

// Runs work(begin, end) over ranges of `total` items on TensorFlow's intra-op threads.
template <typename Work>
void Parallel(OpKernelContext* context, int64_t total, int64_t cost_per_item, Work work) {
  auto* threads = context->device()->tensorflow_cpu_worker_threads();
  tensorflow::Shard(threads->num_threads, threads->workers, total, cost_per_item, work);
}

// sums [G, C, 32] = sum_n routes_gcn [V_gcn, V_gcn^2].
class EmVoteSumsOp : public OpKernel {
 public:
  using OpKernel::OpKernel;
  void Compute(OpKernelContext* context) override {
    Votes votes;
    if (!votes.Read(context) ||
        !CheckInput(context, 3, "routes",
                    TensorShape({votes.groups, votes.parents, votes.children})))
      return;
    Tensor* output = nullptr;
    OP_REQUIRES_OK(context, context->allocate_output(
                                0, TensorShape({votes.groups, votes.parents, 2 * kPose}),
                                &output));
    const float* routes = context->input(3).flat<float>().data();
    float* sums = output->flat<float>().data();
    const int64_t parents = votes.parents, children = votes.children, padded = votes.padded;
    Parallel(context, votes.groups, parents * padded * 10, [&](int64_t begin, int64_t end) {
      std::vector<float> rows(kPose * padded), route(padded);
      for (int64_t g = begin; g < end; ++g) {
        votes.Transpose(g, rows.data());
        for (int64_t c = 0; c < parents; ++c) {
          votes.Pad(routes + (g * parents + c) * children, route.data());
          const float* kernel = votes.kernel(c);
          const float* center = votes.center(g, c);
          Lanes first[kPose] = {}, second[kPose] = {}, vote[kPose];
          for (int64_t offset = 0; offset < padded; offset += kLanes) {
            votes.Vote(rows.data(), kernel, center, offset, vote);
            const Lanes r = Load(route.data() + offset);
            for (int h = 0; h < kPose; ++h) {
              const Lanes routed = r * vote[h];
              first[h] += routed;
              second[h] += routed * vote[h];
            }
          }
          float* out = sums + (g * parents + c) * 2 * kPose;
          Store(SumEach(first), out);
          Store(SumEach(second), out + kPose);
        }
      }
    });
  }
};

// distances [G, C, N] = [V_gcn, V_gcn^2] . weights_gc for weights [G, C, 32].
class EmVoteDistancesOp : public OpKernel {
 public:
  using OpKernel::OpKernel;
  void Compute(OpKernelContext* context) override {
    Votes votes;
    if (!votes.Read(context) ||
        !CheckInput(context, 3, "weights", TensorShape({votes.groups, votes.parents, 2 * kPose})))
      return;
    Tensor* output = nullptr;
    OP_REQUIRES_OK(context, context->allocate_output(
                                0, TensorShape({votes.groups, votes.parents, votes.children}),
                                &output));
    const float* weights = context->input(3).flat<float>().data();
    float* distances = output->flat<float>().data();
    const int64_t parents = votes.parents, children = votes.children, padded = votes.padded;
    Parallel(context, votes.groups, parents * padded * 10, [&](int64_t begin, int64_t end) {
      std::vector<float> rows(kPose * padded), row(padded);
      for (int64_t g = begin; g < end; ++g) {
        votes.Transpose(g, rows.data());
        for (int64_t c = 0; c < parents; ++c) {
          const float* kernel = votes.kernel(c);
          const float* center = votes.center(g, c);
          const float* w = weights + (g * parents + c) * 2 * kPose;
          for (int64_t offset = 0; offset < padded; offset += kLanes) {
            Lanes vote[kPose], total = {};
            votes.Vote(rows.data(), kernel, center, offset, vote);
            for (int h = 0; h < kPose; ++h) total += vote[h] * (w[h] + vote[h] * w[kPose + h]);
            Store(total, row.data() + offset);
          }
          std::copy(row.data(), row.data() + children,
                    distances + (g * parents + c) * children);
        }
      }
    });
  }
};

// The gradient of the patches and the kernel from d[V, V^2] = sum_k lefts_k (x) rights_k
// (lefts [K, G, C, N], rights [K, G, C, 32]): dV = sum_k lefts_k (rights_k[:16] +
// 2 V rights_k[16:]), then d P_gn = sum_c dV_gcn W_nc^T and d W_nc = sum_g P_gn^T dV_gcn.
// The center is a constant of the routing (no gradient). d W is summed over a fixed
// partition of the groups, then over its blocks in order: the same bits on any number
// of threads.
class EmVoteGradientOp : public OpKernel {
 public:
  using OpKernel::OpKernel;
  void Compute(OpKernelContext* context) override {
    Votes votes;
    if (!votes.Read(context)) return;
    const Tensor& lefts_input = context->input(3);
    const int64_t terms = lefts_input.dims() == 4 ? lefts_input.dim_size(0) : -1;
    const int64_t groups = votes.groups, parents = votes.parents, children = votes.children,
                  padded = votes.padded;
    if (!CheckInput(context, 3, "lefts", TensorShape({std::max<int64_t>(terms, 0), groups,
                                                      parents, children})) ||
        !CheckInput(context, 4, "rights",
                    TensorShape({terms, groups, parents, 2 * kPose})))
      return;
    Tensor* d_patches = nullptr;
    Tensor* d_kernel = nullptr;
    OP_REQUIRES_OK(context, context->allocate_output(0, TensorShape({groups, children, kPose}),
                                                     &d_patches));
    OP_REQUIRES_OK(context, context->allocate_output(1, TensorShape({children, parents, kPose}),
                                                     &d_kernel));
    const float* lefts = lefts_input.flat<float>().data();
    const float* rights = context->input(4).flat<float>().data();
    float* dp = d_patches->flat<float>().data();
    const int64_t blocks = std::min<int64_t>(groups, kBlocks);
    // d W per block, children along the lanes: [blocks, C, 16, padded N].
    std::vector<float> kernel_terms(blocks * parents * kPose * padded, 0.0f);
    const int64_t block_cost = (groups + blocks - 1) / blocks * parents * padded * (30 + 2 * terms);
    Parallel(context, blocks, block_cost, [&](int64_t first_block, int64_t end_block) {
      std::vector<float> rows(kPose * padded), patch_terms(kPose * padded);
      std::vector<float> left(terms * padded), right(terms * 2 * kPose);
      for (int64_t block = first_block; block < end_block; ++block) {
        float* block_terms = kernel_terms.data() + block * parents * kPose * padded;
        for (int64_t g = block * groups / blocks; g < (block + 1) * groups / blocks; ++g) {
          votes.Transpose(g, rows.data());
          std::fill(patch_terms.begin(), patch_terms.end(), 0.0f);
          for (int64_t c = 0; c < parents; ++c) {
            const int64_t route = g * parents + c;
            for (int64_t k = 0; k < terms; ++k) {
              votes.Pad(lefts + (k * groups * parents + route) * children,
                        left.data() + k * padded);
              const float* from = rights + (k * groups * parents + route) * 2 * kPose;
              for (int h = 0; h < kPose; ++h) {
                right[k * 2 * kPose + h] = from[h];
                right[k * 2 * kPose + kPose + h] = 2.0f * from[kPose + h];
              }
            }
            const float* kernel = votes.kernel(c);
            const float* center = votes.center(g, c);
            float* terms_c = block_terms + c * kPose * padded;
            for (int64_t offset = 0; offset < padded; offset += kLanes) {
              Lanes vote[kPose], d_vote[kPose];
              votes.Vote(rows.data(), kernel, center, offset, vote);
              for (int h = 0; h < kPose; ++h) d_vote[h] = Lanes{};
              for (int64_t k = 0; k < terms; ++k) {
                const Lanes l = Load(left.data() + k * padded + offset);
                const float* r = right.data() + k * 2 * kPose;
                for (int h = 0; h < kPose; ++h) d_vote[h] += l * (r[h] + vote[h] * r[kPose + h]);
              }
              // d P[i*4+t] += sum_j dV[i*4+j] W[t*4+j];  d W[t*4+j] += sum_i P[i*4+t] dV[i*4+j]
              for (int i = 0; i < 4; ++i)
                for (int t = 0; t < 4; ++t) {
                  Lanes total = {};
                  for (int j = 0; j < 4; ++j)
                    total += d_vote[i * 4 + j] * Load(kernel + (t * 4 + j) * padded + offset);
                  Add(total, patch_terms.data() + (i * 4 + t) * padded + offset);
                }
              for (int t = 0; t < 4; ++t)
                for (int j = 0; j < 4; ++j) {
                  Lanes total = {};
                  for (int i = 0; i < 4; ++i)
                    total += Load(rows.data() + (i * 4 + t) * padded + offset) * d_vote[i * 4 + j];
                  Add(total, terms_c + (t * 4 + j) * padded + offset);
                }
            }
          }
          for (int64_t n = 0; n < children; ++n)
            for (int h = 0; h < kPose; ++h)
              dp[(g * children + n) * kPose + h] = patch_terms[h * padded + n];
        }
      }
    });
    float* dw = d_kernel->flat<float>().data();
    for (int64_t n = 0; n < children; ++n)
      for (int64_t c = 0; c < parents; ++c)
        for (int h = 0; h < kPose; ++h) {
          float total = 0.0f;
          for (int64_t block = 0; block < blocks; ++block)
            total += kernel_terms[((block * parents + c) * kPose + h) * padded + n];
          dw[(n * parents + c) * kPose + h] = total;
        }
  }

 private:
  static constexpr int64_t kBlocks = 16;
};

absl::Status VotesShape(InferenceContext* context, int last) {
  using ::tensorflow::shape_inference::DimensionHandle;
  const DimensionHandle groups = context->Dim(context->input(0), 0);
  const DimensionHandle children = context->Dim(context->input(0), 1);
  const DimensionHandle parents = context->Dim(context->input(1), 1);
  context->set_output(
      0, context->MakeShape({groups, parents, last < 0 ? children : context->MakeDim(last)}));
  return absl::OkStatus();
}

}  // namespace

REGISTER_OP("CapsulesEmVoteSums")
    .Input("patches: float")
    .Input("kernel: float")
    .Input("center: float")
    .Input("routes: float")
    .Output("sums: float")
    .SetShapeFn([](InferenceContext* context) { return VotesShape(context, 2 * kPose); });
REGISTER_KERNEL_BUILDER(Name("CapsulesEmVoteSums").Device(DEVICE_CPU), EmVoteSumsOp);

REGISTER_OP("CapsulesEmVoteDistances")
    .Input("patches: float")
    .Input("kernel: float")
    .Input("center: float")
    .Input("weights: float")
    .Output("distances: float")
    .SetShapeFn([](InferenceContext* context) { return VotesShape(context, -1); });
REGISTER_KERNEL_BUILDER(Name("CapsulesEmVoteDistances").Device(DEVICE_CPU), EmVoteDistancesOp);

REGISTER_OP("CapsulesEmVoteGradient")
    .Input("patches: float")
    .Input("kernel: float")
    .Input("center: float")
    .Input("lefts: float")
    .Input("rights: float")
    .Output("d_patches: float")
    .Output("d_kernel: float")
    .SetShapeFn([](InferenceContext* context) {
      context->set_output(0, context->input(0));
      context->set_output(1, context->input(1));
      return absl::OkStatus();
    });
REGISTER_KERNEL_BUILDER(Name("CapsulesEmVoteGradient").Device(DEVICE_CPU), EmVoteGradientOp);

}  // namespace capsules

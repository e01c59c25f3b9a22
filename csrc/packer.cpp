// Host-side batch packer for the data loader: per-sample random reconstruction masks and varlen
// metadata, written into caller-provided fixed-capacity buffers (so a CUDA graph downstream can
// replay with the same addresses). Python API and the numpy twin: tgdp/pack.py — both must
// produce bit-identical outputs, so every arithmetic step here is mirrored there.
//
// Random stream of sample b (splitmix64, Steele et al. 2014):
//   base    = mix64(mix64(seed ^ kSeedSalt) ^ step)
//   state_b = mix64(base ^ b);  next() = mix64(state_b += kGolden)
// Partial Fisher-Yates over the valid tokens (ascending token order):
//   for j < k: r = j + (((next() >> 32) * (n - j)) >> 32); swap(perm[j], perm[r])
// (multiply-shift bounding: exact integer maths, bias < n / 2^32, identical in numpy uint64).

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace py = pybind11;

namespace {

constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ULL;
constexpr uint64_t kSeedSalt = 0x243F6A8885A308D3ULL;  // pi digits: seed 0 must not map to state 0

inline uint64_t mix64(uint64_t z) {
  z ^= z >> 30;
  z *= 0xBF58476D1CE4E5B9ULL;
  z ^= z >> 27;
  z *= 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

struct Geometry {
  int64_t num_patches;   // N
  int64_t rows, cols;    // cols == 0: generic prefix form; else valid counts time columns
  double ratio;          // used when keep < 0
  int64_t keep;          // fixed k (clamped to the valid count), or -1
  int64_t extra_front;   // e.g. 1 CLS
  int64_t extra_back;    // e.g. R registers
};

[[noreturn]] void fail(const std::string& msg) { throw std::invalid_argument(msg); }

std::string dtype_name(const py::array& a) { return py::str(a.dtype()).cast<std::string>(); }

std::string shape_str(const py::array& a) {
  std::string s = "(";
  for (py::ssize_t d = 0; d < a.ndim(); ++d) {
    s += std::to_string(a.shape(d));
    if (a.ndim() == 1 || d + 1 < a.ndim()) s += a.ndim() == 1 ? "," : ", ";
  }
  return s + ")";
}

// dtype, writability and contiguity of one output buffer; messages match tgdp/pack.py.
template <typename T>
T* out_ptr(py::array& a, const char* name, const char* want) {
  if (!py::isinstance<py::array_t<T>>(a) || a.itemsize() != sizeof(T))
    fail(std::string(name) + " must be " + want + ", got " + dtype_name(a));
  if (!(a.flags() & py::array::c_style)) fail(std::string(name) + " must be C-contiguous");
  if (!a.writeable()) fail(std::string(name) + " is read-only");
  return static_cast<T*>(a.mutable_data());
}

void check_shape(const py::array& a, const char* name, std::vector<int64_t> want, const std::string& what) {
  bool ok = a.ndim() == static_cast<py::ssize_t>(want.size());
  for (size_t d = 0; ok && d < want.size(); ++d) ok = want[d] < 0 || a.shape(d) == want[d];
  if (!ok) fail(std::string(name) + " has shape " + shape_str(a) + " but " + what);
}

// Keep count of a sample with n valid tokens: floor(n * (1 - ratio)), at least 1 when n >= 1
// (tgdp.masking.num_keep), or the fixed k clamped to n. Same double arithmetic as numpy.
inline int64_t keep_count(int64_t n, const Geometry& g) {
  if (n == 0) return 0;
  if (g.keep >= 0) return std::min(g.keep, n);
  const auto k = static_cast<int64_t>(std::floor(static_cast<double>(n) * (1.0 - g.ratio)));
  return std::max<int64_t>(1, k);
}

template <typename M>
void fill_sample(int64_t b, int64_t tv, int64_t k, const Geometry& g, uint64_t base, int64_t* perm,
                 int64_t* keep_row, int64_t keep_cap, int64_t* restore_row, M* mask_row) {
  const int64_t N = g.num_patches;
  // Valid tokens first (ascending), padding tokens after (ascending): ids_shuffle before the draw.
  int64_t n = 0;
  if (g.cols == 0) {
    n = tv;
    for (int64_t t = 0; t < N; ++t) perm[t] = t;
  } else {
    n = g.rows * tv;
    int64_t pad = n;
    for (int64_t f = 0; f < g.rows; ++f)
      for (int64_t t = 0; t < g.cols; ++t) {
        const int64_t tok = f * g.cols + t;
        if (t < tv) perm[f * tv + t] = tok;
        else perm[pad++] = tok;
      }
  }
  uint64_t state = mix64(base ^ static_cast<uint64_t>(b));
  for (int64_t j = 0; j < k; ++j) {
    state += kGolden;
    const uint64_t x = mix64(state);
    const int64_t r = j + static_cast<int64_t>(((x >> 32) * static_cast<uint64_t>(n - j)) >> 32);
    std::swap(perm[j], perm[r]);
  }
  for (int64_t j = 0; j < keep_cap; ++j) keep_row[j] = j < k ? perm[j] : -1;
  for (int64_t j = 0; j < N; ++j) {
    restore_row[perm[j]] = j;
    mask_row[perm[j]] = static_cast<M>(j < k ? 0 : 1);
  }
}

py::tuple pack(py::array valid, int64_t num_patches, int64_t rows, int64_t cols, double ratio,
               int64_t keep, uint64_t seed, uint64_t step, int64_t extra_front, int64_t extra_back,
               py::array ids_keep, py::array ids_restore, py::array mask, py::array cu_seqlens,
               py::array pos_ids, py::array seq_ids) {
  const Geometry g{num_patches, rows, cols, ratio, keep, extra_front, extra_back};
  // ---- scalars (order and wording mirror tgdp/pack.py::_validate_scalars) ----
  if (num_patches < 1) fail("num_patches=" + std::to_string(num_patches) + " must be >= 1");
  if (cols != 0) {
    if (rows < 1 || cols < 1)
      fail("grid=(" + std::to_string(rows) + ", " + std::to_string(cols) + ") must be positive");
    if (rows * cols != num_patches)
      fail("grid=(" + std::to_string(rows) + ", " + std::to_string(cols) + ") has " +
           std::to_string(rows * cols) + " tokens but num_patches=" + std::to_string(num_patches));
  }
  if (keep < 0 && !(ratio >= 0.0 && ratio < 1.0))  // also rejects NaN
    fail("ratio=" + py::repr(py::float_(ratio)).cast<std::string>() + " must be in [0, 1)");
  if (keep > num_patches)
    fail("keep=" + std::to_string(keep) + " exceeds num_patches=" + std::to_string(num_patches));
  if (extra_front < 0 || extra_back < 0)
    fail("extra_front=" + std::to_string(extra_front) + ", extra_back=" + std::to_string(extra_back) +
         " must be >= 0");
  // ---- valid counts ----
  if (!py::isinstance<py::array_t<int64_t>>(valid) || valid.itemsize() != 8)
    fail("valid must be int64, got " + dtype_name(valid));
  if (valid.ndim() != 1) fail("valid must be 1-D [B], got shape " + shape_str(valid));
  const int64_t B = valid.shape(0);
  std::vector<int64_t> tv(static_cast<size_t>(B)), k(static_cast<size_t>(B));
  const int64_t limit = cols == 0 ? num_patches : cols;
  int64_t total = 0, kmax = 0, max_seqlen = 0;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t v = *static_cast<const int64_t*>(valid.data(b));  // honours strides
    if (v < 0) fail("valid[" + std::to_string(b) + "]=" + std::to_string(v) + " is negative");
    if (v > limit) {
      if (cols == 0)
        fail("valid[" + std::to_string(b) + "]=" + std::to_string(v) + " exceeds num_patches=" +
             std::to_string(num_patches));
      fail("valid[" + std::to_string(b) + "]=" + std::to_string(v) + " exceeds cols=" +
           std::to_string(cols) + " of grid=(" + std::to_string(rows) + ", " + std::to_string(cols) +
           ") (grid form counts valid time columns)");
    }
    tv[b] = v;
    k[b] = keep_count(cols == 0 ? v : rows * v, g);
    kmax = std::max(kmax, k[b]);
    const int64_t len = extra_front + k[b] + extra_back;
    max_seqlen = std::max(max_seqlen, len);
    total += len;
  }
  if (total > std::numeric_limits<int32_t>::max())
    fail("batch packs " + std::to_string(total) + " tokens, more than int32 cu_seqlens can hold");
  // ---- output buffers ----
  const std::string batch_msg = "the batch has B=" + std::to_string(B) + " samples";
  const std::string grid_msg = batch_msg + " of num_patches=" + std::to_string(num_patches);
  int64_t* keep_p = out_ptr<int64_t>(ids_keep, "ids_keep", "int64");
  check_shape(ids_keep, "ids_keep", {B, -1}, "must be [B, capacity]; " + batch_msg);
  const int64_t keep_cap = ids_keep.shape(1);
  if (keep_cap < kmax)
    fail("ids_keep holds " + std::to_string(keep_cap) + " tokens per row but a sample keeps " +
         std::to_string(kmax));
  int64_t* restore_p = out_ptr<int64_t>(ids_restore, "ids_restore", "int64");
  check_shape(ids_restore, "ids_restore", {B, num_patches}, "must be [B, N]; " + grid_msg);
  const std::string mdt = dtype_name(mask);
  if (mdt != "uint8" && mdt != "bool" && mdt != "float32")
    fail("mask must be uint8, bool or float32, got " + mdt);
  if (!(mask.flags() & py::array::c_style)) fail("mask must be C-contiguous");
  if (!mask.writeable()) fail("mask is read-only");
  check_shape(mask, "mask", {B, num_patches}, "must be [B, N]; " + grid_msg);
  int32_t* cu_p = out_ptr<int32_t>(cu_seqlens, "cu_seqlens", "int32");
  check_shape(cu_seqlens, "cu_seqlens", {B + 1}, "must be [B + 1]; " + batch_msg);
  int64_t* pos_p = out_ptr<int64_t>(pos_ids, "pos_ids", "int64");
  check_shape(pos_ids, "pos_ids", {-1}, "must be 1-D [capacity]");
  const int64_t tok_cap = pos_ids.shape(0);
  if (tok_cap < total)
    fail("pos_ids holds " + std::to_string(tok_cap) + " tokens but the batch packs " +
         std::to_string(total));
  int32_t* seq_p = out_ptr<int32_t>(seq_ids, "seq_ids", "int32");
  check_shape(seq_ids, "seq_ids", {tok_cap}, "must match pos_ids [" + std::to_string(tok_cap) + "]");

  const uint64_t base = mix64(mix64(seed ^ kSeedSalt) ^ step);
  void* mask_p = mask.mutable_data();
  {
    // Hot loop: plain memory only from here on, so other Python threads (the loader) can run.
    py::gil_scoped_release release;
    std::vector<int64_t> perm(static_cast<size_t>(num_patches));
    for (int64_t b = 0; b < B; ++b) {
      int64_t* keep_row = keep_p + b * keep_cap;
      int64_t* restore_row = restore_p + b * num_patches;
      if (mdt == "float32")
        fill_sample(b, tv[b], k[b], g, base, perm.data(), keep_row, keep_cap, restore_row,
                    static_cast<float*>(mask_p) + b * num_patches);
      else  // uint8 and numpy bool share the 0/1 byte layout
        fill_sample(b, tv[b], k[b], g, base, perm.data(), keep_row, keep_cap, restore_row,
                    static_cast<uint8_t*>(mask_p) + b * num_patches);
    }
    int64_t off = 0;
    cu_p[0] = 0;
    for (int64_t b = 0; b < B; ++b) {
      const int64_t* keep_row = keep_p + b * keep_cap;
      for (int64_t j = 0; j < extra_front; ++j) pos_p[off + j] = -1;
      std::copy(keep_row, keep_row + k[b], pos_p + off + extra_front);
      for (int64_t j = 0; j < extra_back; ++j) pos_p[off + extra_front + k[b] + j] = -1;
      const int64_t len = extra_front + k[b] + extra_back;
      std::fill(seq_p + off, seq_p + off + len, static_cast<int32_t>(b));
      off += len;
      cu_p[b + 1] = static_cast<int32_t>(off);
    }
    std::fill(pos_p + total, pos_p + tok_cap, int64_t{-1});
    std::fill(seq_p + total, seq_p + tok_cap, int32_t{-1});
  }
  return py::make_tuple(total, max_seqlen);
}

}  // namespace

PYBIND11_MODULE(_packer, m) {
  m.doc() = "tgdp host-side batch packer (see tgdp/pack.py for the Python API)";
  // Bumped with any change of the pack() signature or of the random stream; tgdp/pack.py ignores
  // a stale build with another version instead of producing different masks.
  m.attr("VERSION") = 1;
  m.def("pack", &pack, py::arg("valid"), py::arg("num_patches"), py::arg("rows"), py::arg("cols"),
        py::arg("ratio"), py::arg("keep"), py::arg("seed"), py::arg("step"), py::arg("extra_front"),
        py::arg("extra_back"), py::arg("ids_keep"), py::arg("ids_restore"), py::arg("mask"),
        py::arg("cu_seqlens"), py::arg("pos_ids"), py::arg("seq_ids"),
        "Fill the packer buffers in place; returns (total_tokens, max_seqlen). See tgdp.pack.pack.");
  m.def("splitmix64_stream", [](uint64_t seed, uint64_t step, uint64_t sample, int64_t count) {
    // Exposed so tests can pin the PRNG to the numpy twin and to published splitmix64 values.
    std::vector<uint64_t> out(static_cast<size_t>(std::max<int64_t>(count, 0)));
    uint64_t state = mix64(mix64(mix64(seed ^ kSeedSalt) ^ step) ^ sample);
    for (auto& x : out) x = mix64(state += kGolden);
    return py::array_t<uint64_t>(static_cast<py::ssize_t>(out.size()), out.data());
  }, py::arg("seed"), py::arg("step"), py::arg("sample"), py::arg("count"));
  m.def("mix64", &mix64, py::arg("z"));
}

// bdp-run: native runner for a bdp bundle (no Python needed).
//
//   bdp-run [--repeat N] [--warmup N] BUNDLE INPUT.npy OUTDIR
//
// Loads BUNDLE/model.so (a Relax VM executable exported by TVM), reads
// INPUT.npy (float32, little-endian, C order, any rank), runs the VM's
// "main" once and writes one OUTDIR/<name>.npy per output, where the names
// come, in order, from BUNDLE/manifest.json "outputs": [{"name": ...}, ...].
// The input shape is checked against the manifest's "input": {"shape": [...]}
// (or "inputs"[0]["shape"]); a dimension given as a string, null or a
// negative number matches any size.
//
// With --repeat N (N >= 1) it runs "main" --warmup times (default 1) untimed,
// then N timed times, and prints one JSON line on stdout:
//   {"repeat": N, "warmup": W, "median_ms": ..., "p90_ms": ..., "p99_ms": ...,
//    "mean_ms": ..., "min_ms": ..., "max_ms": ...}
// The outputs of the last run are written as usual.
//
// Exit codes: 0 success; 2 bad usage or bad input (wrong dtype, wrong shape,
// unreadable .npy, missing bundle files), with one line on stderr; 1 model
// or runtime failure.
//
// The manifest is parsed with tvm-ffi's own JSON reader (tvm::ffi::json).
// Threads: the TVM runtime honours TVM_NUM_THREADS.
//
// Build (see bdp/targets/aarch64.py, build_runner):
//   aarch64-linux-gnu-g++ -std=c++17 -O2 bdp_run.cc -I<tvm_ffi/include>
//     -I<tvm/include> -L<lib> -Wl,--no-as-needed -ltvm_ffi -ltvm_runtime
//     -Wl,-rpath,'$ORIGIN/../lib'

#include <dlpack/dlpack.h>
#include <tvm/ffi/any.h>
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/map.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/json.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/string.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <optional>
#include <sstream>
#include <string>
#include <sys/stat.h>
#include <vector>

namespace ffi = tvm::ffi;

namespace {

constexpr int kExitOk = 0;
constexpr int kExitRuntime = 1;
constexpr int kExitInput = 2;

// An error that ends the program with a given exit code and one stderr line.
struct Fail {
  int code;
  std::string msg;
};

[[noreturn]] void fail(int code, const std::string& msg) { throw Fail{code, msg}; }

std::string one_line(std::string s) {
  for (char& c : s) {
    if (c == '\n' || c == '\r') c = ' ';
  }
  while (!s.empty() && s.back() == ' ') s.pop_back();
  return s;
}

std::string shape_str(const std::vector<int64_t>& shape) {
  std::string s = "(";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(shape[i]);
  }
  if (shape.size() == 1) s += ",";
  return s + ")";
}

std::string read_file(const std::string& path, int code_if_missing) {
  std::ifstream f(path, std::ios::binary);
  if (!f) fail(code_if_missing, "cannot read " + path + ": " + std::strerror(errno));
  return std::string(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
}

bool is_dir(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

// ---------------------------------------------------------------- CPU tensors

struct AlignedCPUAlloc {
  void AllocData(DLTensor* t) {
    size_t n = ffi::GetDataSize(*t);
    void* p = nullptr;
    if (posix_memalign(&p, 64, n == 0 ? 64 : n) != 0) p = nullptr;
    if (p == nullptr) fail(kExitRuntime, "out of memory allocating " + std::to_string(n) + " bytes");
    t->data = p;
  }
  void FreeData(DLTensor* t) { std::free(t->data); }
};

// ---------------------------------------------------------------- .npy in

struct NpyHeader {
  std::string descr;
  bool fortran = false;
  std::vector<int64_t> shape;
};

// Parse the Python-dict header numpy writes, e.g.
// {'descr': '<f4', 'fortran_order': False, 'shape': (1, 3, 8, 8), }
NpyHeader parse_npy_header(const std::string& h, const std::string& path) {
  auto bad = [&](const std::string& why) { fail(kExitInput, path + ": not a valid .npy header (" + why + ")"); };
  auto value_after = [&](const std::string& key) -> size_t {
    size_t k = h.find("'" + key + "'");
    if (k == std::string::npos) bad("no '" + key + "'");
    size_t c = h.find(':', k);
    if (c == std::string::npos) bad("no value for '" + key + "'");
    size_t v = h.find_first_not_of(" \t", c + 1);
    if (v == std::string::npos) bad("no value for '" + key + "'");
    return v;
  };
  NpyHeader out;
  size_t v = value_after("descr");
  if (h[v] != '\'' && h[v] != '"') bad("descr is not a plain dtype string (structured array?)");
  size_t e = h.find(h[v], v + 1);
  if (e == std::string::npos) bad("unterminated descr");
  out.descr = h.substr(v + 1, e - v - 1);

  v = value_after("fortran_order");
  if (h.compare(v, 4, "True") == 0) {
    out.fortran = true;
  } else if (h.compare(v, 5, "False") != 0) {
    bad("fortran_order is neither True nor False");
  }

  v = value_after("shape");
  if (h[v] != '(') bad("shape is not a tuple");
  size_t close = h.find(')', v);
  if (close == std::string::npos) bad("unterminated shape");
  std::string dims = h.substr(v + 1, close - v - 1);
  size_t i = 0;
  while (i < dims.size()) {
    while (i < dims.size() && (dims[i] == ' ' || dims[i] == ',')) ++i;
    if (i >= dims.size()) break;
    size_t j = i;
    while (j < dims.size() && dims[j] >= '0' && dims[j] <= '9') ++j;
    if (j == i) bad("shape has a non-integer entry");
    out.shape.push_back(std::stoll(dims.substr(i, j - i)));
    // numpy 1.x may write 'L' suffixes on Python 2; tolerate them.
    while (j < dims.size() && (dims[j] == 'L' || dims[j] == ' ')) ++j;
    i = j;
  }
  return out;
}

ffi::Tensor read_npy_float32(const std::string& path) {
  std::string buf = read_file(path, kExitInput);
  static const char kMagic[] = "\x93NUMPY";
  if (buf.size() < 10 || buf.compare(0, 6, kMagic, 6) != 0) fail(kExitInput, path + ": not a .npy file");
  unsigned major = static_cast<unsigned char>(buf[6]);
  size_t hlen = 0, hstart = 0;
  if (major == 1) {
    hlen = static_cast<unsigned char>(buf[8]) | (static_cast<unsigned char>(buf[9]) << 8);
    hstart = 10;
  } else if (major == 2 || major == 3) {
    if (buf.size() < 12) fail(kExitInput, path + ": truncated .npy header");
    hlen = 0;
    for (int k = 3; k >= 0; --k) hlen = (hlen << 8) | static_cast<unsigned char>(buf[8 + k]);
    hstart = 12;
  } else {
    fail(kExitInput, path + ": unsupported .npy format version " + std::to_string(major));
  }
  if (buf.size() < hstart + hlen) fail(kExitInput, path + ": truncated .npy header");
  NpyHeader hdr = parse_npy_header(buf.substr(hstart, hlen), path);

  if (hdr.descr != "<f4" && hdr.descr != "=f4") {
    fail(kExitInput, path + ": dtype '" + hdr.descr + "' is not supported; the input must be float32 ('<f4')");
  }
  if (hdr.fortran && hdr.shape.size() > 1) {
    fail(kExitInput, path + ": Fortran-order array; save a C-order float32 array (numpy.ascontiguousarray)");
  }
  int64_t numel = 1;
  for (int64_t d : hdr.shape) numel *= d;
  size_t nbytes = static_cast<size_t>(numel) * sizeof(float);
  size_t data_start = hstart + hlen;
  if (buf.size() - data_start != nbytes) {
    fail(kExitInput, path + ": holds " + std::to_string(buf.size() - data_start) + " data bytes, shape " +
                         shape_str(hdr.shape) + " float32 needs " + std::to_string(nbytes));
  }
  ffi::Tensor t = ffi::Tensor::FromNDAlloc(AlignedCPUAlloc(), ffi::ShapeView(hdr.shape.data(), hdr.shape.size()),
                                           DLDataType{kDLFloat, 32, 1}, DLDevice{kDLCPU, 0});
  if (nbytes) std::memcpy(t.data_ptr(), buf.data() + data_start, nbytes);
  return t;
}

// ---------------------------------------------------------------- .npy out

std::string npy_descr(DLDataType dt) {
  if (dt.lanes != 1) fail(kExitRuntime, "output with vector dtype (lanes=" + std::to_string(dt.lanes) + ")");
  int bytes = dt.bits / 8;
  std::string b = std::to_string(bytes);
  switch (dt.code) {
    case kDLFloat:
      if (dt.bits == 16 || dt.bits == 32 || dt.bits == 64) return "<f" + b;
      break;
    case kDLInt:
      if (dt.bits == 8) return "|i1";
      if (dt.bits == 16 || dt.bits == 32 || dt.bits == 64) return "<i" + b;
      break;
    case kDLUInt:
      if (dt.bits == 8) return "|u1";
      if (dt.bits == 16 || dt.bits == 32 || dt.bits == 64) return "<u" + b;
      break;
    case kDLBool:
      if (dt.bits == 8) return "|b1";
      break;
    default:
      break;
  }
  fail(kExitRuntime, "output dtype (code " + std::to_string(dt.code) + ", bits " + std::to_string(dt.bits) +
                         ") has no .npy equivalent");
}

void write_npy(const std::string& path, const ffi::Tensor& t) {
  const DLTensor* dl = t.GetDLTensorPtr();
  if (dl->device.device_type != kDLCPU) fail(kExitRuntime, "output is not on the CPU");
  if (!t.IsContiguous()) fail(kExitRuntime, "output is not contiguous");
  std::string descr = npy_descr(dl->dtype);
  std::string shape = shape_str(std::vector<int64_t>(dl->shape, dl->shape + dl->ndim));
  std::string header = "{'descr': '" + descr + "', 'fortran_order': False, 'shape': " + shape + ", }";
  // Pad so that magic(6) + version(2) + len(2) + header + '\n' is a multiple of 64.
  size_t total = 10 + header.size() + 1;
  header.append((64 - total % 64) % 64, ' ');
  header.push_back('\n');

  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  if (!f) fail(kExitInput, "cannot write " + path + ": " + std::strerror(errno));
  f.write("\x93NUMPY\x01\x00", 8);
  uint16_t hl = static_cast<uint16_t>(header.size());
  char hb[2] = {static_cast<char>(hl & 0xff), static_cast<char>(hl >> 8)};
  f.write(hb, 2);
  f.write(header.data(), static_cast<std::streamsize>(header.size()));
  size_t nbytes = ffi::GetDataSize(*dl);
  const char* data = static_cast<const char*>(dl->data) + dl->byte_offset;
  f.write(data, static_cast<std::streamsize>(nbytes));
  if (!f) fail(kExitRuntime, "failed writing " + path);
}

// ---------------------------------------------------------------- manifest

struct Manifest {
  std::vector<std::string> output_names;
  std::optional<std::vector<std::optional<int64_t>>> input_shape;  // nullopt dim: any size
};

std::optional<ffi::Any> get_key(const ffi::Any& obj, const char* key) {
  auto m = obj.as<ffi::Map<ffi::Any, ffi::Any>>();
  if (!m) return std::nullopt;
  auto it = m->find(ffi::String(key));
  if (it == m->end()) return std::nullopt;
  return (*it).second;
}

Manifest read_manifest(const std::string& path) {
  std::string text = read_file(path, kExitInput);
  ffi::String err;
  ffi::Any root = ffi::json::Parse(ffi::String(text), &err);
  if (!err.empty()) fail(kExitInput, path + ": invalid JSON: " + one_line(std::string(err)));
  if (!root.as<ffi::Map<ffi::Any, ffi::Any>>()) fail(kExitInput, path + ": not a JSON object");

  Manifest m;
  auto outputs = get_key(root, "outputs");
  auto out_arr = outputs ? outputs->as<ffi::Array<ffi::Any>>() : std::nullopt;
  if (!out_arr) fail(kExitInput, path + ": no \"outputs\" list");
  for (size_t i = 0; i < out_arr->size(); ++i) {
    auto name = get_key((*out_arr)[i], "name");
    auto s = name ? name->as<ffi::String>() : std::nullopt;
    if (!s || s->empty()) fail(kExitInput, path + ": outputs[" + std::to_string(i) + "] has no \"name\" string");
    std::string n(*s);
    if (n.find('/') != std::string::npos || n == "." || n == "..") {
      fail(kExitInput, path + ": output name '" + n + "' cannot be used as a file name");
    }
    m.output_names.push_back(n);
  }

  std::optional<ffi::Any> input = get_key(root, "input");
  if (!input) {
    auto inputs = get_key(root, "inputs");
    auto arr = inputs ? inputs->as<ffi::Array<ffi::Any>>() : std::nullopt;
    if (arr && arr->size() >= 1) input = (*arr)[0];
  }
  if (input) {
    auto shape = get_key(*input, "shape");
    auto dims = shape ? shape->as<ffi::Array<ffi::Any>>() : std::nullopt;
    if (dims) {
      std::vector<std::optional<int64_t>> s;
      for (const ffi::Any& d : *dims) {
        auto iv = d.as<int64_t>();
        if (!iv) {
          auto fv = d.as<double>();
          if (fv && std::floor(*fv) == *fv) iv = static_cast<int64_t>(*fv);
        }
        if (iv && *iv >= 0) {
          s.push_back(*iv);
        } else {
          s.push_back(std::nullopt);  // symbolic / unknown dimension
        }
      }
      m.input_shape = s;
    }
  }
  return m;
}

void check_input_shape(const Manifest& m, const ffi::Tensor& x, const std::string& path) {
  if (!m.input_shape) return;
  const auto& want = *m.input_shape;
  std::vector<int64_t> got(x.shape().begin(), x.shape().end());
  bool ok = want.size() == got.size();
  for (size_t i = 0; ok && i < want.size(); ++i) {
    if (want[i] && *want[i] != got[i]) ok = false;
  }
  if (!ok) {
    std::string w = "(";
    for (size_t i = 0; i < want.size(); ++i) {
      if (i) w += ", ";
      w += want[i] ? std::to_string(*want[i]) : "?";
    }
    w += want.size() == 1 ? ",)" : ")";
    fail(kExitInput, path + ": input shape " + shape_str(got) + " does not match the bundle's input shape " + w);
  }
}

// ---------------------------------------------------------------- outputs

void flatten_outputs(const ffi::Any& v, std::vector<ffi::Tensor>* out) {
  if (auto t = v.as<ffi::Tensor>()) {
    out->push_back(*t);
    return;
  }
  if (auto arr = v.as<ffi::Array<ffi::Any>>()) {
    for (const ffi::Any& e : *arr) flatten_outputs(e, out);
    return;
  }
  fail(kExitRuntime, "main returned a " + v.GetTypeKey() + ", expected a tensor or a tuple of tensors");
}

// ---------------------------------------------------------------- main

struct Args {
  std::string bundle, input, outdir;
  long repeat = 0;
  long warmup = 1;
};

const char* kUsage =
    "usage: bdp-run [--repeat N] [--warmup N] BUNDLE INPUT.npy OUTDIR\n"
    "  Runs BUNDLE/model.so on a float32 .npy and writes OUTDIR/<output name>.npy\n"
    "  for every output listed in BUNDLE/manifest.json.\n"
    "  --repeat N   time N runs; print {\"median_ms\", \"p90_ms\", \"p99_ms\", ...} as one JSON line\n"
    "  --warmup N   untimed runs before timing (default 1)\n";

long parse_count(const std::string& opt, const std::string& v, long min) {
  char* end = nullptr;
  errno = 0;
  long n = std::strtol(v.c_str(), &end, 10);
  if (v.empty() || *end != '\0' || errno != 0 || n < min) {
    fail(kExitInput, opt + " needs an integer >= " + std::to_string(min) + ", got '" + v + "'");
  }
  return n;
}

Args parse_args(int argc, char** argv) {
  Args a;
  std::vector<std::string> pos;
  for (int i = 1; i < argc; ++i) {
    std::string s = argv[i];
    auto value = [&](const std::string& opt) -> std::string {
      size_t eq = s.find('=');
      if (eq != std::string::npos) return s.substr(eq + 1);
      if (i + 1 >= argc) fail(kExitInput, opt + " needs a value");
      return argv[++i];
    };
    if (s == "-h" || s == "--help") {
      std::fputs(kUsage, stdout);
      std::exit(kExitOk);
    } else if (s == "--repeat" || s.rfind("--repeat=", 0) == 0) {
      a.repeat = parse_count("--repeat", value("--repeat"), 1);
    } else if (s == "--warmup" || s.rfind("--warmup=", 0) == 0) {
      a.warmup = parse_count("--warmup", value("--warmup"), 0);
    } else if (s.size() > 1 && s[0] == '-' && s != "-") {
      fail(kExitInput, "unknown option '" + s + "' (see --help)");
    } else {
      pos.push_back(s);
    }
  }
  if (pos.size() != 3) fail(kExitInput, "expected BUNDLE INPUT.npy OUTDIR, got " + std::to_string(pos.size()) + " arguments (see --help)");
  a.bundle = pos[0];
  a.input = pos[1];
  a.outdir = pos[2];
  return a;
}

double percentile(const std::vector<double>& sorted, double q) {
  // Linear interpolation between closest ranks (numpy's default).
  if (sorted.empty()) return 0.0;
  double pos = q * static_cast<double>(sorted.size() - 1);
  size_t lo = static_cast<size_t>(std::floor(pos));
  size_t hi = std::min(lo + 1, sorted.size() - 1);
  double frac = pos - static_cast<double>(lo);
  return sorted[lo] + (sorted[hi] - sorted[lo]) * frac;
}

int run(int argc, char** argv) {
  Args a = parse_args(argc, argv);
  if (!is_dir(a.bundle)) fail(kExitInput, "bundle folder '" + a.bundle + "' does not exist");
  std::string model_path = a.bundle + "/model.so";
  std::string manifest_path = a.bundle + "/manifest.json";
  {
    struct stat st;
    if (::stat(model_path.c_str(), &st) != 0) fail(kExitInput, model_path + " not found: is '" + a.bundle + "' a bdp bundle?");
  }
  Manifest manifest = read_manifest(manifest_path);

  ffi::Tensor input = read_npy_float32(a.input);
  check_input_shape(manifest, input, a.input);

  if (!is_dir(a.outdir) && ::mkdir(a.outdir.c_str(), 0777) != 0 && errno != EEXIST) {
    fail(kExitInput, "cannot create output folder " + a.outdir + ": " + std::strerror(errno));
  }

  // Load the library and the Relax VM inside it.
  ffi::Module lib = ffi::Module::LoadFromFile(ffi::String(model_path));
  auto load_exec = lib->GetFunction("vm_load_executable");
  if (!load_exec) fail(kExitRuntime, model_path + " is not a Relax VM executable (no vm_load_executable)");
  ffi::Module vm = (*load_exec)().cast<ffi::Module>();
  auto init = vm->GetFunction("vm_initialization");
  if (!init) fail(kExitRuntime, "VM has no vm_initialization");
  constexpr int kPooledAllocator = 2;
  (*init)(static_cast<int>(kDLCPU), 0, kPooledAllocator);
  auto main_fn = vm->GetFunction("main");
  if (!main_fn) fail(kExitRuntime, model_path + " has no function 'main'");

  ffi::Any result;
  std::vector<double> times_ms;
  if (a.repeat > 0) {
    for (long i = 0; i < a.warmup; ++i) result = (*main_fn)(input);
    times_ms.reserve(static_cast<size_t>(a.repeat));
    for (long i = 0; i < a.repeat; ++i) {
      auto t0 = std::chrono::steady_clock::now();
      result = (*main_fn)(input);
      auto t1 = std::chrono::steady_clock::now();
      times_ms.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
    }
  } else {
    result = (*main_fn)(input);
  }

  std::vector<ffi::Tensor> outs;
  flatten_outputs(result, &outs);
  if (outs.size() != manifest.output_names.size()) {
    fail(kExitRuntime, "main returned " + std::to_string(outs.size()) + " outputs but " + manifest_path + " lists " +
                           std::to_string(manifest.output_names.size()));
  }
  for (size_t i = 0; i < outs.size(); ++i) {
    write_npy(a.outdir + "/" + manifest.output_names[i] + ".npy", outs[i]);
  }

  if (a.repeat > 0) {
    std::vector<double> s = times_ms;
    std::sort(s.begin(), s.end());
    double sum = 0;
    for (double t : s) sum += t;
    std::printf(
        "{\"repeat\": %ld, \"warmup\": %ld, \"median_ms\": %.4f, \"p90_ms\": %.4f, \"p99_ms\": %.4f, "
        "\"mean_ms\": %.4f, \"min_ms\": %.4f, \"max_ms\": %.4f}\n",
        a.repeat, a.warmup, percentile(s, 0.5), percentile(s, 0.9), percentile(s, 0.99), sum / s.size(), s.front(),
        s.back());
    std::fflush(stdout);
  }
  return kExitOk;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const Fail& f) {
    std::fprintf(stderr, "bdp-run: %s\n", one_line(f.msg).c_str());
    return f.code;
  } catch (const ffi::Error& e) {
    std::fprintf(stderr, "bdp-run: %s: %s\n", e.kind().c_str(), one_line(e.message()).c_str());
    return kExitRuntime;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bdp-run: %s\n", one_line(e.what()).c_str());
    return kExitRuntime;
  }
}

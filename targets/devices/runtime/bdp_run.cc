// bdp-run: native runner for a bdp bundle (no Python needed).
//
//   bdp-run [--trust KEY.pub] [--repeat N] [--warmup N] BUNDLE INPUT.npy OUTDIR
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
// Signed bundles: with --trust KEY.pub (or BDP_TRUST=KEY.pub in the environment) the runner
// refuses the bundle (exit 2) unless BUNDLE/manifest.sig (base64 of a 64-byte Ed25519
// signature) verifies over the exact bytes of BUNDLE/manifest.json with the PEM public key
// KEY.pub, and every file the manifest lists ("files": {path: {"sha256": hex}}) has that
// sha256; only then is model.so loaded. The checks use the system's OpenSSL libcrypto
// (libcrypto.so.3), opened with dlopen when --trust is given: no link-time dependency, and
// nothing needed without --trust. The runner and lib/ it was started from are not checked (they
// are already running): run untrusted bundles with a bdp-run installed from a bundle you trust.
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

#include <dlfcn.h>

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

Manifest read_manifest(const std::string& path, const std::string& text) {
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

// ---------------------------------------------------------------- signatures (--trust)

std::string base64_decode(const std::string& in, const std::string& what) {
  auto val = [](char c) -> int {
    if (c >= 'A' && c <= 'Z') return c - 'A';
    if (c >= 'a' && c <= 'z') return c - 'a' + 26;
    if (c >= '0' && c <= '9') return c - '0' + 52;
    if (c == '+') return 62;
    if (c == '/') return 63;
    return -1;
  };
  std::string out;
  uint32_t acc = 0;
  int bits = 0, pad = 0;
  for (char c : in) {
    if (c == ' ' || c == '\n' || c == '\r' || c == '\t') continue;
    if (c == '=') {
      ++pad;
      continue;
    }
    int v = val(c);
    if (v < 0 || pad) fail(kExitInput, what + ": not base64");
    acc = (acc << 6) | static_cast<uint32_t>(v);
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      out.push_back(static_cast<char>((acc >> bits) & 0xff));
    }
  }
  if (pad > 2) fail(kExitInput, what + ": not base64");
  return out;
}

// The 32-byte Ed25519 key of a PEM "PUBLIC KEY" (SubjectPublicKeyInfo, as `bdp keys new` and
// `openssl pkey -pubout` write it): the DER is a fixed 12-byte prefix and the key.
std::string read_ed25519_public_key(const std::string& path) {
  std::string pem = read_file(path, kExitInput);
  const std::string begin = "-----BEGIN PUBLIC KEY-----", end = "-----END PUBLIC KEY-----";
  size_t b = pem.find(begin), e = pem.find(end);
  if (b == std::string::npos || e == std::string::npos || e < b) {
    fail(kExitInput, path + ": not a PEM public key (the .pub file of `bdp keys new`)");
  }
  std::string der = base64_decode(pem.substr(b + begin.size(), e - b - begin.size()), path);
  static const unsigned char kPrefix[12] = {0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00};
  if (der.size() != 44 || std::memcmp(der.data(), kPrefix, sizeof(kPrefix)) != 0) {
    fail(kExitInput, path + ": not an Ed25519 public key");
  }
  return der.substr(12);
}

// libcrypto, opened at run time.
struct Crypto {
  void* handle = nullptr;
  void* (*pkey_new_raw_public_key)(int, void*, const unsigned char*, size_t) = nullptr;
  void (*pkey_free)(void*) = nullptr;
  void* (*md_ctx_new)() = nullptr;
  void (*md_ctx_free)(void*) = nullptr;
  int (*digest_verify_init)(void*, void**, const void*, void*, void*) = nullptr;
  int (*digest_verify)(void*, const unsigned char*, size_t, const unsigned char*, size_t) = nullptr;
  const void* (*sha256)() = nullptr;
  int (*digest)(const void*, size_t, unsigned char*, unsigned int*, const void*, void*) = nullptr;

  Crypto() {
    for (const char* name : {"libcrypto.so.3", "libcrypto.so"}) {
      handle = ::dlopen(name, RTLD_NOW | RTLD_LOCAL);
      if (handle) break;
    }
    if (!handle) {
      fail(kExitInput, "--trust needs OpenSSL's libcrypto.so.3, which is not installed (apt install libssl3)");
    }
    sym(pkey_new_raw_public_key, "EVP_PKEY_new_raw_public_key");
    sym(pkey_free, "EVP_PKEY_free");
    sym(md_ctx_new, "EVP_MD_CTX_new");
    sym(md_ctx_free, "EVP_MD_CTX_free");
    sym(digest_verify_init, "EVP_DigestVerifyInit");
    sym(digest_verify, "EVP_DigestVerify");
    sym(sha256, "EVP_sha256");
    sym(digest, "EVP_Digest");
  }
  template <typename F>
  void sym(F& f, const char* name) {
    f = reinterpret_cast<F>(::dlsym(handle, name));
    if (!f) fail(kExitInput, std::string("libcrypto has no ") + name + " (OpenSSL 1.1.1 or newer needed for --trust)");
  }

  bool verify_ed25519(const std::string& key, const std::string& sig, const std::string& msg) {
    constexpr int kEvpPkeyEd25519 = 1087;  // NID_ED25519
    void* pkey = pkey_new_raw_public_key(kEvpPkeyEd25519, nullptr,
                                         reinterpret_cast<const unsigned char*>(key.data()), key.size());
    if (!pkey) fail(kExitInput, "libcrypto refused the public key");
    void* ctx = md_ctx_new();
    bool ok = ctx && digest_verify_init(ctx, nullptr, nullptr, nullptr, pkey) == 1 &&
              digest_verify(ctx, reinterpret_cast<const unsigned char*>(sig.data()), sig.size(),
                            reinterpret_cast<const unsigned char*>(msg.data()), msg.size()) == 1;
    if (ctx) md_ctx_free(ctx);
    pkey_free(pkey);
    return ok;
  }

  std::string sha256_hex(const std::string& data) {
    unsigned char md[32];
    unsigned int n = 0;
    if (digest(data.data(), data.size(), md, &n, sha256(), nullptr) != 1 || n != 32) {
      fail(kExitRuntime, "libcrypto could not compute a sha256");
    }
    static const char* hex = "0123456789abcdef";
    std::string out;
    for (unsigned char c : md) {
      out.push_back(hex[c >> 4]);
      out.push_back(hex[c & 15]);
    }
    return out;
  }
};

bool safe_bundle_path(const std::string& rel) {
  if (rel.empty() || rel[0] == '/' || rel.find('\\') != std::string::npos) return false;
  size_t start = 0;
  while (true) {
    size_t slash = rel.find('/', start);
    std::string part = rel.substr(start, slash == std::string::npos ? std::string::npos : slash - start);
    if (part.empty() || part == "." || part == "..") return false;
    if (slash == std::string::npos) return true;
    start = slash + 1;
  }
}

// Refuse the bundle unless manifest.sig verifies over MANIFEST_TEXT with KEY_PATH and every
// listed file matches its sha256; model.so must be among them.
void verify_bundle(const std::string& bundle, const std::string& manifest_text, const std::string& key_path) {
  Crypto crypto;
  std::string key = read_ed25519_public_key(key_path);
  std::string sig_path = bundle + "/manifest.sig";
  struct stat st;
  if (::stat(sig_path.c_str(), &st) != 0) {
    fail(kExitInput, bundle + ": not signed (no manifest.sig) but a trust key is given (" + key_path + ")");
  }
  std::string sig = base64_decode(read_file(sig_path, kExitInput), sig_path);
  if (sig.size() != 64) fail(kExitInput, sig_path + ": not an Ed25519 signature");
  if (!crypto.verify_ed25519(key, sig, manifest_text)) {
    fail(kExitInput, bundle + ": the manifest's signature does not verify with " + key_path +
                         " (tampered, or signed with another key)");
  }
  ffi::String err;
  ffi::Any root = ffi::json::Parse(ffi::String(manifest_text), &err);
  auto files = err.empty() ? get_key(root, "files") : std::nullopt;
  auto fmap = files ? files->as<ffi::Map<ffi::Any, ffi::Any>>() : std::nullopt;
  if (!fmap) fail(kExitInput, bundle + "/manifest.json: no \"files\" map to check");
  bool has_model = false;
  for (const auto& kv : *fmap) {
    auto rel = kv.first.as<ffi::String>();
    auto want = get_key(kv.second, "sha256");
    auto want_s = want ? want->as<ffi::String>() : std::nullopt;
    if (!rel || !want_s || !safe_bundle_path(std::string(*rel))) {
      fail(kExitInput, bundle + "/manifest.json: a \"files\" entry is not a safe path with a sha256");
    }
    std::string r(*rel);
    if (r == "model.so") has_model = true;
    if (crypto.sha256_hex(read_file(bundle + "/" + r, kExitInput)) != std::string(*want_s)) {
      fail(kExitInput, bundle + ": " + r + " does not match its sha256 in the signed manifest (tampered or corrupt)");
    }
  }
  if (!has_model) fail(kExitInput, bundle + "/manifest.json: the signed manifest does not list model.so");
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
  std::string bundle, input, outdir, trust;
  long repeat = 0;
  long warmup = 1;
};

const char* kUsage =
    "usage: bdp-run [--trust KEY.pub] [--repeat N] [--warmup N] BUNDLE INPUT.npy OUTDIR\n"
    "  Runs BUNDLE/model.so on a float32 .npy and writes OUTDIR/<output name>.npy\n"
    "  for every output listed in BUNDLE/manifest.json.\n"
    "  --repeat N   time N runs; print {\"median_ms\", \"p90_ms\", \"p99_ms\", ...} as one JSON line\n"
    "  --warmup N   untimed runs before timing (default 1)\n"
    "  --trust KEY.pub  refuse the bundle unless manifest.sig verifies with this Ed25519 key and\n"
    "               every file matches its sha256 (default: $BDP_TRUST; uses libcrypto.so.3)\n";

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
    } else if (s == "--trust" || s.rfind("--trust=", 0) == 0) {
      a.trust = value("--trust");
      if (a.trust.empty()) fail(kExitInput, "--trust needs a public key file");
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
  if (a.trust.empty()) {
    const char* env = std::getenv("BDP_TRUST");
    // set but empty is an error, never "no key": a check the user asked for never fails open
    if (env && !*env) fail(kExitInput, "BDP_TRUST is set but empty; set it to a public key file (.pub) or unset it");
    if (env) a.trust = env;
  }
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
  std::string manifest_text = read_file(manifest_path, kExitInput);
  if (!a.trust.empty()) verify_bundle(a.bundle, manifest_text, a.trust);  // before model.so is loaded
  Manifest manifest = read_manifest(manifest_path, manifest_text);

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

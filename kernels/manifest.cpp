#include "manifest.h"

#include <openssl/evp.h>
#include <openssl/pem.h>

#include <array>
#include <fstream>
#include <iterator>
#include <memory>
#include <set>
#include <sstream>

#include <torch/headeronly/version.h>

namespace deepcache {
namespace fs = std::filesystem;

namespace {

c10::ScalarType dtype_from_name(const std::string& name) {
  static const std::map<std::string, c10::ScalarType> dtypes = {
      {"float32", c10::kFloat}, {"float16", c10::kHalf}, {"bfloat16", c10::kBFloat16},
      {"float64", c10::kDouble}, {"int64", c10::kLong},  {"int32", c10::kInt}};
  auto it = dtypes.find(name);
  if (it == dtypes.end()) throw ManifestError("input dtype " + name + " is not supported by the native runtime");
  return it->second;
}

// "2.13.0+cpu" -> "2.13.0": libtorch knows its release, not the wheel's local tag.
std::string release(const std::string& version) { return version.substr(0, version.find('+')); }

void check_file(const fs::path& file, uint64_t size, const std::string& digest) {
  if (!fs::is_regular_file(file))
    throw ManifestError(file.string() + " is missing: copy the whole export directory");
  if (fs::file_size(file) != size)
    throw ManifestError(file.string() + " has " + std::to_string(fs::file_size(file)) + " bytes, the manifest says " +
                        std::to_string(size) + ": the file is truncated or replaced");
  if (sha256_file(file) != digest)
    throw ManifestError(file.string() + " does not match its sha256 in the manifest: the file was modified");
}

// The instruction sets this CPU has, from /proc/cpuinfo (empty where it cannot be read).
std::set<std::string> cpu_flags() {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("flags", 0) != 0) continue;
    std::istringstream words(line.substr(line.find(':') + 1));
    return {std::istream_iterator<std::string>(words), std::istream_iterator<std::string>()};
  }
  return {};
}

void check_isa(const nlohmann::json& j, const fs::path& path) {
  if (!j.contains("cpu_isa") || j["cpu_isa"].is_null()) return;
  const auto here = cpu_flags();
  if (here.empty()) return;
  std::string missing;
  for (const auto& flag : j["cpu_isa"].get<std::vector<std::string>>())
    if (!here.count(flag)) missing += (missing.empty() ? "'" : ", '") + flag + "'";
  if (!missing.empty())
    throw ManifestError(path.string() + ": the engines were compiled for a CPU with [" + missing + "], which this CPU " +
                        "lacks: export again on this machine (or on one with the same instruction sets)");
}

std::string read_bytes(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw ManifestError(path.string() + " cannot be read");
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

using PublicKey = std::unique_ptr<EVP_PKEY, decltype(&EVP_PKEY_free)>;

PublicKey read_public_key(const std::string& path) {
  std::unique_ptr<BIO, decltype(&BIO_free)> bio(BIO_new_file(path.c_str(), "r"), BIO_free);
  if (!bio) throw std::invalid_argument("trusted key " + path + " cannot be read");
  PublicKey key(PEM_read_bio_PUBKEY(bio.get(), nullptr, nullptr, nullptr), EVP_PKEY_free);
  if (!key || EVP_PKEY_id(key.get()) != EVP_PKEY_ED25519)
    throw std::invalid_argument("trusted key " + path + " is not an Ed25519 public key (PEM)");
  return key;
}

bool verifies(EVP_PKEY* key, const std::string& data, const std::string& signature) {
  std::unique_ptr<EVP_MD_CTX, decltype(&EVP_MD_CTX_free)> ctx(EVP_MD_CTX_new(), EVP_MD_CTX_free);
  if (EVP_DigestVerifyInit(ctx.get(), nullptr, nullptr, nullptr, key) != 1) return false;
  return EVP_DigestVerify(ctx.get(), reinterpret_cast<const unsigned char*>(signature.data()), signature.size(),
                          reinterpret_cast<const unsigned char*>(data.data()), data.size()) == 1;
}

// The manifest's bytes after their signature verified with one of the trusted keys.
std::string verified_manifest(const fs::path& directory, const std::vector<std::string>& trusted_keys) {
  std::vector<PublicKey> keys;
  for (const auto& path : trusted_keys) keys.push_back(read_public_key(path));
  const fs::path manifest = directory / kManifest, signature = directory / kSignature;
  if (!fs::is_regular_file(manifest))
    throw ManifestError(manifest.string() + " is missing: not a deepcache_compile export (see dc.export)");
  if (!fs::is_regular_file(signature))
    throw ManifestError(signature.string() + " is missing: the export is not signed; export with sign_key=");
  const auto data = read_bytes(manifest), signed_bytes = read_bytes(signature);
  if (signed_bytes.size() != 64)
    throw ManifestError(signature.string() + " has " + std::to_string(signed_bytes.size()) +
                        " bytes, an Ed25519 signature has 64: the signature is damaged");
  for (const auto& key : keys)
    if (verifies(key.get(), data, signed_bytes)) return data;
  throw ManifestError(signature.string() + " does not verify with any trusted key: the export was signed by "
                      "another key, or its manifest changed after signing");
}

}  // namespace

void ShapeRanges::check(const std::vector<int64_t>& shape) const {
  const struct { const char* what; int64_t value; const int64_t* range; } dims[] = {
      {"batch", shape.front(), batch}, {"height", shape[shape.size() - 2], height},
      {"width", shape.back(), width}};
  for (const auto& d : dims) {
    auto lo = d.range[0], hi = d.range[1];
    if (d.value < lo || d.value > hi)
      throw std::invalid_argument("sample " + std::string(d.what) + "=" + std::to_string(d.value) +
                                  " is outside this export's range " + std::to_string(lo) + ".." +
                                  std::to_string(hi) + ": export again with " + d.what + "=(" +
                                  std::to_string(std::min(lo, d.value)) + ", " +
                                  std::to_string(std::max(hi, d.value)) + ")");
    if (std::string(d.what) != "batch" && d.value % multiple)
      throw std::invalid_argument("sample " + std::string(d.what) + "=" + std::to_string(d.value) +
                                  " is not a multiple of " + std::to_string(multiple) +
                                  ", which this export needs (the U-Net downsamples by " + std::to_string(multiple) +
                                  "): pad or resize the input");
  }
}

std::string sha256_file(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw ManifestError(path.string() + " cannot be read");
  std::unique_ptr<EVP_MD_CTX, decltype(&EVP_MD_CTX_free)> ctx(EVP_MD_CTX_new(), EVP_MD_CTX_free);
  EVP_DigestInit_ex(ctx.get(), EVP_sha256(), nullptr);
  std::vector<char> block(1 << 20);
  while (in) {
    in.read(block.data(), static_cast<std::streamsize>(block.size()));
    EVP_DigestUpdate(ctx.get(), block.data(), static_cast<size_t>(in.gcount()));
  }
  std::array<unsigned char, EVP_MAX_MD_SIZE> digest{};
  unsigned int length = 0;
  EVP_DigestFinal_ex(ctx.get(), digest.data(), &length);
  std::ostringstream hex;
  for (unsigned int i = 0; i < length; ++i) {
    static const char* digits = "0123456789abcdef";
    hex << digits[digest[i] >> 4] << digits[digest[i] & 15];
  }
  return hex.str();
}

std::string ranges_text(const nlohmann::json& ranges) {
  return nlohmann::json{{"batch", ranges.at("batch")}, {"height", ranges.at("height")}, {"width", ranges.at("width")},
                        {"multiple", ranges.at("multiple")}}.dump();
}

void check_compiled_ranges(const Manifest& manifest, const fs::path& file, const std::string& compiled) {
  const auto declared = ranges_text(manifest.json.at("ranges"));
  if (compiled != declared)
    throw ManifestError(file.string() + ": compiled for the ranges " + (compiled.empty() ? "(none)" : compiled) + ", " +
                        kManifest + " declares " + declared + ": the manifest was edited after export; export again");
}

Schedule schedule_from_json(const nlohmann::json& manifest) {
  const auto& s = manifest.at("schedule");
  Schedule schedule;
  schedule.kind = s.at("kind").get<std::string>();
  schedule.interval = s.at("interval").get<int>();
  schedule.steps = s.at("steps").get<std::vector<int>>();
  if (!s.at("num_inference_steps").is_null()) schedule.num_inference_steps = s.at("num_inference_steps").get<int>();
  schedule.always_full_first = s.at("always_full_first").get<int>();
  schedule.always_full_last = s.at("always_full_last").get<int>();
  if (schedule.kind == "nonuniform") schedule.steps = manifest.at("nonuniform_full_steps").get<std::vector<int>>();
  if (s.contains("calibration") && !s["calibration"].is_null()) {
    const auto& c = s["calibration"];
    schedule.calibration = Calibration{c.at("timesteps").get<std::vector<double>>(), c.at("size").at(0).get<int64_t>(),
                                       c.at("size").at(1).get<int64_t>()};
  }
  return schedule;
}

Manifest read_manifest(const fs::path& directory, const std::vector<std::string>& trusted_keys) {
  const fs::path path = directory / kManifest;
  if (trusted_keys.empty() && !fs::is_regular_file(path))
    throw ManifestError(path.string() + " is missing: not a deepcache_compile export (see dc.export)");
  const auto text = trusted_keys.empty() ? read_bytes(path) : verified_manifest(directory, trusted_keys);
  Manifest m;
  m.directory = directory;
  try {
    m.json = nlohmann::json::parse(text);
  } catch (const nlohmann::json::parse_error& err) {
    throw ManifestError(path.string() + " is not valid JSON (" + err.what() + "): the manifest is damaged; export again");
  }
  const auto& j = m.json;
  auto version = j.value("format_version", nlohmann::json());
  if (version != kFormatVersion)
    throw ManifestError(path.string() + " has format_version=" + version.dump() + "; this deepcache_compile reads " +
                        "version " + std::to_string(kFormatVersion) + ": export again with this version");
  m.format = j.at("format").get<std::string>();
  if (m.format != "aoti")
    throw ManifestError(path.string() + ": the native runtime runs AOTInductor exports, this one is " + m.format +
                        ": export with format=\"aoti\"");
  auto built = j.at("versions").value("torch", std::string("unknown"));
  if (release(built) != TORCH_VERSION)
    throw ManifestError(path.string() + ": aoti files were built with torch " + built + ", this is " + TORCH_VERSION +
                        ": export again with this version");
  check_isa(j, path);
  for (const auto& [name, digest] : j.at("sha256").items())
    check_file(directory / name, j.at("sizes").at(name).get<uint64_t>(), digest.get<std::string>());

  m.branch = j.at("branch").get<int>();
  m.schedule = schedule_from_json(j);
  m.calls_per_step = j.at("calls_per_step").get<int>();
  m.forecast = j.value("forecast", false);
  if (j.contains("policy") && !j["policy"].is_null() && j["policy"].value("decided", "") == "device") {
    const auto& s = j["policy"].at("state");
    m.step = DeviceStepPolicy{s.at("cache").get<std::vector<int64_t>>(), s.at("probe").get<std::vector<int64_t>>(),
                              dtype_from_name(s.at("cache_dtype")), dtype_from_name(s.at("probe_dtype")),
                              s.at("limit").get<int64_t>()};
  } else if (j.contains("policy") && !j["policy"].is_null()) {
    const auto& p = j["policy"];
    if (p.at("name") != "adaptive")
      throw ManifestError(path.string() + ": policy " + p.at("name").dump() + " is not one this runtime runs");
    m.policy = AdaptivePolicy{p.at("threshold").get<double>(), p.at("max_skip").get<int>(), p.at("probe").get<int>()};
  }
  for (const auto& in : j.at("inputs")) {
    const auto rank = in.at("rank").get<int64_t>();
    m.inputs.push_back({in.at("name"), dtype_from_name(in.at("dtype")), rank, in.value("batched", rank > 0)});
  }
  const auto& r = j.at("ranges");
  m.ranges = {{r["batch"][0], r["batch"][1]}, {r["height"][0], r["height"][1]}, {r["width"][0], r["width"][1]},
              r["multiple"].get<int64_t>()};
  m.pad_batch = j.value("pad_batch", int64_t{1});
  if (m.pad_batch > 1) m.ranges.batch[0] = 1;
  m.files = j.at("files").get<std::map<std::string, std::vector<std::string>>>();
  if (j.contains("native_ops") && !j["native_ops"].is_null())
    m.native_ops = j["native_ops"].get<std::vector<std::string>>();
  return m;
}

}  // namespace deepcache

// deepcache.json: read and verify an export directory before anything is loaded (the same checks, and the
// same messages, as deepcache_compile/artifacts/manifest.py).
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include <c10/core/ScalarType.h>
#include <nlohmann/json.hpp>

#include "schedule.h"

namespace deepcache {

inline constexpr int kFormatVersion = 2;  // 2: every engine file holds the shape ranges it was compiled for
inline constexpr const char* kRangesKey = "deepcache.ranges";   // their name in the AOTInductor package metadata
inline constexpr const char* kManifest = "deepcache.json";
inline constexpr const char* kSignature = "deepcache.json.sig";  // Ed25519 over the manifest's bytes

// An engine directory is incomplete, tampered with, or made for another version.
class ManifestError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct InputSpec {
  std::string name;
  c10::ScalarType dtype;
  int64_t rank;
  bool batched;  // its first dimension is the call's batch (shapes.py's rule; older manifests: rank > 0)
};

// What an export accepts, in U-Net input pixels.
struct ShapeRanges {
  int64_t batch[2], height[2], width[2], multiple;
  // Throws std::invalid_argument naming the dimension if a sample of `shape` is outside the ranges.
  void check(const std::vector<int64_t>& shape) const;
};

// Adaptive refresh (refresh.AdaptiveRefresh): a step is full when the head's probe has drifted by `threshold`
// (accumulated relative L1 change since the last full step), after `max_skip` shallow steps in a row, and at 0.
struct AdaptivePolicy {
  double threshold = 0.1;
  int max_skip = 10;
  int probe = 0;  // the probe's index among the head graph's outputs
};

// A probe policy decided inside one step package (`split="step"`, graph/step.py): the package takes the
// inputs, then (cache, reference, drift, run, mode) and returns (sample, cache, reference, drift, run, full).
// A generation starts from zeros, drift 0 and run = limit (a full first step); per-row shapes, batch first.
struct DeviceStepPolicy {
  std::vector<int64_t> cache, probe;
  c10::ScalarType cache_dtype = c10::kFloat, probe_dtype = c10::kFloat;
  int64_t limit = 0;
};

struct Manifest {
  std::filesystem::path directory;
  std::string format;
  int branch = 0;
  Schedule schedule;
  int calls_per_step = 1;
  std::optional<AdaptivePolicy> policy;  // set: the export holds head/deep/tail packages, not full/shallow
  std::optional<DeviceStepPolicy> step;  // set: the export holds one step package deciding on the device
  bool forecast = false;                 // the shallow package also takes (slope, steps): see generation.h
  std::vector<InputSpec> inputs;
  ShapeRanges ranges{};   // what the engine serves: from batch 1 where pad_batch > 1
  int64_t pad_batch = 1;  // the packages were compiled from this batch: smaller calls run with repeated rows
  std::map<std::string, std::vector<std::string>> files;  // part -> file names
  std::vector<std::string> native_ops;                     // the project's ops the packages call (kernels.h)
  nlohmann::json json;                                     // the whole manifest

  std::filesystem::path file(const std::string& part) const { return directory / files.at(part).at(0); }
};

// Reads `directory/deepcache.json` and verifies it and every file it lists (size, SHA-256); throws
// ManifestError naming the file and the fix. With `trusted_keys` (Ed25519 public key PEM files), the manifest's
// bytes must first verify against `deepcache.json.sig` with one of them (the same checks and messages as
// deepcache_compile/artifacts/signing.py); the bytes verified are the bytes parsed.
Manifest read_manifest(const std::filesystem::path& directory, const std::vector<std::string>& trusted_keys = {});

// Hex SHA-256 of a file's bytes (OpenSSL's libcrypto).
std::string sha256_file(const std::filesystem::path& path);

// The manifest's ranges as the packages hold them (sorted keys, no spaces; formats/__init__.py's ranges_text).
std::string ranges_text(const nlohmann::json& ranges);

// Throws ManifestError where `compiled` (a package's own ranges) differs from the manifest's (the message of
// artifacts/manifest.py's check_compiled_ranges).
void check_compiled_ranges(const Manifest& manifest, const std::filesystem::path& file, const std::string& compiled);

// The manifest's schedule object ("schedule" plus the resolved non-uniform steps).
Schedule schedule_from_json(const nlohmann::json& manifest);

}  // namespace deepcache

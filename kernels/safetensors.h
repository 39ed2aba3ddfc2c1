// Reading and writing .safetensors files (an 8-byte little-endian header size, a JSON header, raw data):
// how deepcache-generate takes its noise and conditioning and hands back the final sample.
#pragma once

#include <filesystem>
#include <map>
#include <string>

#include <ATen/Tensor.h>

namespace deepcache {

std::map<std::string, at::Tensor> load_safetensors(const std::filesystem::path& path);
void save_safetensors(const std::filesystem::path& path, const std::map<std::string, at::Tensor>& tensors);

}  // namespace deepcache

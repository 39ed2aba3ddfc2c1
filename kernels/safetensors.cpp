#include "safetensors.h"

#include <ATen/ATen.h>
#include <nlohmann/json.hpp>

#include <cstring>
#include <fstream>
#include <stdexcept>

namespace deepcache {
namespace {

const std::map<std::string, at::ScalarType>& dtypes() {
  static const std::map<std::string, at::ScalarType> table = {
      {"F32", at::kFloat}, {"F16", at::kHalf}, {"BF16", at::kBFloat16}, {"F64", at::kDouble},
      {"I64", at::kLong},  {"I32", at::kInt}};
  return table;
}

std::string dtype_name(at::ScalarType type) {
  for (const auto& [name, t] : dtypes())
    if (t == type) return name;
  throw std::invalid_argument(std::string("safetensors: unsupported dtype ") + c10::toString(type));
}

}  // namespace

std::map<std::string, at::Tensor> load_safetensors(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error(path.string() + " cannot be read");
  uint64_t header_size = 0;
  in.read(reinterpret_cast<char*>(&header_size), 8);
  std::string header(header_size, '\0');
  in.read(header.data(), static_cast<std::streamsize>(header_size));
  if (!in) throw std::runtime_error(path.string() + " is not a safetensors file (its header is cut short)");
  const auto meta = nlohmann::json::parse(header);
  std::vector<char> data((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::map<std::string, at::Tensor> tensors;
  for (const auto& [name, info] : meta.items()) {
    if (name == "__metadata__") continue;
    auto shape = info.at("shape").get<std::vector<int64_t>>();
    auto offsets = info.at("data_offsets").get<std::vector<size_t>>();
    auto dtype = dtypes().at(info.at("dtype").get<std::string>());
    auto tensor = at::empty(shape, at::TensorOptions().dtype(dtype));
    if (offsets[1] > data.size() || offsets[1] - offsets[0] != tensor.nbytes())
      throw std::runtime_error(path.string() + ": tensor " + name + " has a wrong size in its header");
    std::memcpy(tensor.data_ptr(), data.data() + offsets[0], tensor.nbytes());
    tensors[name] = tensor;
  }
  return tensors;
}

void save_safetensors(const std::filesystem::path& path, const std::map<std::string, at::Tensor>& tensors) {
  nlohmann::json meta = nlohmann::json::object();
  std::vector<at::Tensor> ordered;
  size_t offset = 0;
  for (const auto& [name, t] : tensors) {
    auto c = t.contiguous().cpu();
    meta[name] = {{"dtype", dtype_name(c.scalar_type())}, {"shape", c.sizes().vec()},
                  {"data_offsets", {offset, offset + c.nbytes()}}};
    offset += c.nbytes();
    ordered.push_back(c);
  }
  std::string header = meta.dump();
  header.append((8 - header.size() % 8) % 8, ' ');  // the format pads the header to 8 bytes
  std::ofstream out(path, std::ios::binary);
  uint64_t header_size = header.size();
  out.write(reinterpret_cast<const char*>(&header_size), 8);
  out.write(header.data(), static_cast<std::streamsize>(header.size()));
  for (const auto& t : ordered) out.write(static_cast<const char*>(t.data_ptr()), static_cast<std::streamsize>(t.nbytes()));
  if (!out) throw std::runtime_error(path.string() + " could not be written");
}

}  // namespace deepcache

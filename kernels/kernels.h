// The compute kernels the compiler substitutes into graphs (libdeepcache_kernels.so: attention.cpp), as the
// runtime sees them: an export's manifest lists the ones its packages call ("native_ops"), and the engine
// checks them before it loads the packages (AOTInductor calls them through the dispatcher, by name).
#pragma once

#include <string>

namespace deepcache {

// Why the op `name` ("deepcache::attention_bf16") cannot run in this process, or "" when it can.
std::string native_op_missing(const std::string& name);

}  // namespace deepcache

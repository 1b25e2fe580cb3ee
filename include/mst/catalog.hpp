#pragma once
// The bundled catalog: models/*.json (Hugging Face config.json files) and
// profiles/*.json (GPU profiles). Wherever a catalog name is accepted, a path
// to a JSON file is accepted too.
#include <filesystem>
#include <string>
#include <vector>

#include "mst/gpu.hpp"
#include "mst/model.hpp"

namespace mst {

// $MST_DATA_DIR, else the source tree this binary was built from, else
// <exe>/../share/mst-plan. Holds models/ and profiles/.
std::filesystem::path data_dir();

std::vector<std::string> model_names();  // sorted catalog names
std::vector<std::string> gpu_names();

// A catalog name (case-insensitive) or a path to a .json file.
ModelSpec find_model(const std::string& name_or_path);
GpuProfile find_gpu(const std::string& name_or_path);
// A model or GPU as a file written here names it, to be found from any directory: a path (a file,
// or a name ending in .json) made absolute, a catalog name as it is.
std::string portable_ref(const std::string& name_or_path);

}  // namespace mst

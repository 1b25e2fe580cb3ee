#include "mst/catalog.hpp"

#include <algorithm>
#include <cctype>
#include <cstdlib>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "mst/error.hpp"

#ifndef MST_SOURCE_DATA_DIR
#define MST_SOURCE_DATA_DIR ""
#endif

namespace mst {

namespace fs = std::filesystem;

fs::path data_dir() {
    if (const char* env = std::getenv("MST_DATA_DIR"); env && *env) {
        // An empty catalog is a misconfiguration, not an empty answer.
        std::error_code ec;
        if (!fs::is_directory(fs::path(env) / "models", ec) || !fs::is_directory(fs::path(env) / "profiles", ec))
            fail("MST_DATA_DIR", printable(env), "expected a folder holding models/ and profiles/");
        return fs::path(env);
    }
    const fs::path source(MST_SOURCE_DATA_DIR);
    if (!source.empty() && fs::is_directory(source / "models")) return source;
    std::error_code ec;
    const fs::path exe = fs::read_symlink("/proc/self/exe", ec);
    if (!ec) {
        const fs::path installed = exe.parent_path().parent_path() / "share" / "mst-plan";
        if (fs::is_directory(installed / "models")) return installed;
    }
    throw UserError("cannot find the model catalog: set MST_DATA_DIR to the folder holding models/ and profiles/");
}

namespace {

std::vector<std::string> names_in(const fs::path& dir) {
    std::vector<std::string> names;
    std::error_code ec;
    for (const auto& entry : fs::directory_iterator(dir, ec))
        if (entry.is_regular_file() && entry.path().extension() == ".json") names.push_back(entry.path().stem().string());
    std::sort(names.begin(), names.end());
    return names;
}

std::string lower(std::string s) {
    std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
    return s;
}

// A path when it names a file or ends in .json; otherwise a catalog entry.
bool is_path(const std::string& name_or_path) {
    return fs::path(name_or_path).extension() == ".json" || name_or_path.find('/') != std::string::npos;
}

fs::path resolve(const std::string& name_or_path, const char* folder, const char* what) {
    const fs::path as_path(name_or_path);
    if (is_path(name_or_path)) return as_path;
    const fs::path dir = data_dir() / folder;
    const auto names = names_in(dir);
    const std::string wanted = lower(name_or_path);
    for (const auto& n : names)
        if (lower(n) == wanted) return dir / (n + ".json");
    // (a name cut short, "h100": the entries it begins, rather than the one a few edits away)
    std::vector<std::string> begun;
    for (const auto& n : names)
        if (!wanted.empty() && lower(n).starts_with(wanted)) begun.push_back(n);
    fail(name_or_path, what,
         fmt::format("expected a catalog name ({}) or a path to a .json file; {}", fmt::join(names, ", "),
                     begun.empty() ? fmt::format("the closest is {}", closest(wanted, names))
                                   : fmt::format("{} begin{} with it", fmt::join(begun, " and "), begun.size() == 1 ? "s" : "")));
}

}  // namespace

std::string portable_ref(const std::string& name_or_path) {
    if (!is_path(name_or_path)) return name_or_path;
    std::error_code ec;
    const fs::path absolute = fs::absolute(name_or_path, ec);
    return ec ? name_or_path : absolute.lexically_normal().string();
}

std::vector<std::string> model_names() { return names_in(data_dir() / "models"); }
std::vector<std::string> gpu_names() { return names_in(data_dir() / "profiles"); }

ModelSpec find_model(const std::string& name_or_path) {
    return load_model_file(resolve(name_or_path, "models", "model"));
}

GpuProfile find_gpu(const std::string& name_or_path) { return load_gpu_file(resolve(name_or_path, "profiles", "gpu")); }

}  // namespace mst

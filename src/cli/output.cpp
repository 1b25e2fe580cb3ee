#include "output.hpp"

#include <algorithm>
#include <cstdio>
#include <fstream>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "mst/error.hpp"

namespace mst::cli {

std::string Table::str() const {
    std::vector<std::size_t> width(header_.size(), 0);
    for (std::size_t c = 0; c < header_.size(); ++c) width[c] = header_[c].size();
    for (const auto& r : rows_)
        for (std::size_t c = 0; c < r.size() && c < width.size(); ++c) width[c] = std::max(width[c], r[c].size());
    auto line = [&](const std::vector<std::string>& cells) {
        std::string out;
        for (std::size_t c = 0; c < width.size(); ++c) {
            const std::string& cell = c < cells.size() ? cells[c] : std::string();
            if (c > 0) out += "  ";
            out += c == 0 ? fmt::format("{:<{}}", cell, width[c]) : fmt::format("{:>{}}", cell, width[c]);
        }
        while (!out.empty() && out.back() == ' ') out.pop_back();
        return out + "\n";
    };
    std::size_t total = 0;
    for (auto w : width) total += w + 2;
    const std::string sep(total > 2 ? total - 2 : 0, '-');
    std::string out = line(header_) + sep + "\n";
    for (const auto& r : rows_) out += r.empty() ? sep + "\n" : line(r);
    return out;
}

void Table::print() const { std::fputs(str().c_str(), stdout); }

std::string json_text(const nlohmann::json& j, int indent) {
    return j.dump(indent, ' ', false, nlohmann::json::error_handler_t::replace);
}

void print_json(const nlohmann::json& j) { std::puts(json_text(j, 2).c_str()); }

void warn(const std::string& message) { fmt::print(stderr, "warning: {}\n", printable(message)); }

namespace fs = std::filesystem;

OutputFiles::~OutputFiles() {
    std::error_code ec;
    for (const Pending& p : pending_) fs::remove(p.temp, ec);
    for (auto it = created_.rbegin(); it != created_.rend(); ++it) fs::remove(*it, ec);  // only if still empty
}

void OutputFiles::make_directory(const std::string& dir) {
    std::error_code ec;
    std::vector<fs::path> missing;  // the folders this call creates, deepest first
    for (fs::path p = fs::absolute(dir, ec); !ec && !p.empty() && !fs::exists(p, ec); p = p.parent_path()) {
        missing.push_back(p);
        if (p == p.parent_path()) break;
    }
    fs::create_directories(dir, ec);
    if (ec || !fs::is_directory(dir, ec)) fail(dir, "out", "expected a directory that exists or can be created");
    created_.insert(created_.end(), missing.rbegin(), missing.rend());
}

void OutputFiles::add(const std::string& path, const std::string& text) {
    const fs::path target(path);
    std::error_code ec;
    if (fs::is_directory(target, ec)) fail(path, "file", "expected a file to write, got a directory");
    const fs::path folder = target.parent_path().empty() ? fs::path(".") : target.parent_path();
    if (!fs::is_directory(folder, ec)) fail(path, "file", "expected a writable path (its folder does not exist)");
    // Beside the destination, so the rename stays within one filesystem.
    const fs::path temp = folder / fmt::format(".{}.mst-plan-{}.tmp", target.filename().string(), pending_.size());
    pending_.push_back({temp, target});
    std::ofstream out(temp, std::ios::binary);
    out << text;
    out.close();
    if (!out) fail(path, "file", "expected a writable path");
}

void OutputFiles::commit() {
    for (std::size_t i = 0; i < pending_.size(); ++i) {
        std::error_code ec;
        fs::rename(pending_[i].temp, pending_[i].path, ec);
        if (ec) fail(pending_[i].path.string(), "file", fmt::format("expected a writable path ({})", ec.message()));
        pending_[i].temp.clear();
    }
    pending_.clear();
    created_.clear();
}

}  // namespace mst::cli

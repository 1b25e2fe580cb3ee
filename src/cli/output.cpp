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

void print_json(const nlohmann::json& j) { std::puts(j.dump(2).c_str()); }

void write_text_file(const std::string& path, const std::string& text) {
    std::ofstream out(path, std::ios::binary);
    out << text;
    out.close();
    if (!out) fail(path, "file", "expected a writable path");
}

void warn(const std::string& message) { fmt::print(stderr, "warning: {}\n", message); }

}  // namespace mst::cli

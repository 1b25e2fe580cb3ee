#include "output.hpp"

#include <algorithm>
#include <cstdio>
#include <fstream>

#include <unistd.h>

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
    for (const Pending& p : pending_)
        if (!p.temp.empty()) fs::remove(p.temp, ec);
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
    std::error_code ec;
    const fs::path given(path);
    const fs::file_status status = fs::status(given, ec);  // (of what a link points to)
    if (fs::is_directory(status)) fail(path, "file", "expected a file to write, got a directory");
    const auto same_place = [&](const fs::path& a, const fs::path& b) {
        std::error_code e;
        return fs::weakly_canonical(fs::absolute(a, e), e) == fs::weakly_canonical(fs::absolute(b, e), e);
    };
    for (const Pending& p : pending_)
        if (same_place(p.path, given))
            fail(path, "file", "expected a path of its own (another output of this command is written there)");
    if (fs::exists(status) && !fs::is_regular_file(status)) {  // a device, a FIFO (through a link too): written into
        pending_.push_back({{}, given, text});
        return;
    }
    // A link (to a file, or to none yet) is written through: its target is replaced, the link stays.
    fs::path target = given;
    for (int links = 0; fs::is_symlink(fs::symlink_status(target, ec)); ++links) {
        if (links == 40) fail(path, "file", "expected a path whose links end (40 followed)");
        const fs::path next = fs::read_symlink(target, ec);
        if (ec) fail(path, "file", fmt::format("expected a readable link ({})", ec.message()));
        target = next.is_absolute() ? next : target.parent_path() / next;
    }
    const fs::path folder = target.parent_path().empty() ? fs::path(".") : target.parent_path();
    if (!fs::is_directory(folder, ec)) fail(path, "file", "expected a writable path (its folder does not exist)");
    // Beside the destination, so the rename stays within one filesystem; a short name (the
    // destination's may already be as long as a name can be), this process's own.
    const fs::path temp = folder / fmt::format(".mst-plan-{}-{}.tmp", static_cast<long>(::getpid()), pending_.size());
    pending_.push_back({temp, target, {}});
    std::ofstream out(temp, std::ios::binary);
    out << text;
    out.close();
    if (!out) fail(path, "file", "expected a writable path");
}

void OutputFiles::commit() {
    // Devices and FIFOs first: one that cannot take its text fails the command before any file is
    // replaced.
    for (Pending& p : pending_) {
        if (!p.temp.empty()) continue;
        std::ofstream out(p.path, std::ios::binary | std::ios::out);
        out << p.text;
        out.close();
        if (!out) fail(p.path.string(), "file", "expected a writable path (writing into it failed)");
    }
    for (std::size_t i = 0; i < pending_.size(); ++i) {
        if (pending_[i].temp.empty()) continue;
        std::error_code ec;
        fs::rename(pending_[i].temp, pending_[i].path, ec);
        if (ec) fail(pending_[i].path.string(), "file", fmt::format("expected a writable path ({})", ec.message()));
        pending_[i].temp.clear();
    }
    pending_.clear();
    created_.clear();
}

}  // namespace mst::cli

#include "output.hpp"

#include <algorithm>
#include <cstdio>
#include <cerrno>
#include <cstring>

#include <fcntl.h>
#include <sys/stat.h>
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

namespace {

// What commit() left for finish_outputs: the process's, which main() finishes once.
struct Ready {
    std::vector<std::pair<fs::path, fs::path>> files;  // (temporary, destination)
    std::vector<fs::path> folders;                     // made for them, parents first
};
Ready& ready() {
    static Ready r;
    return r;
}

// Writes all of `text` to `fd`; false on an error.
bool write_all(int fd, const std::string& text) {
    for (std::size_t done = 0; done < text.size();) {
        const ssize_t n = ::write(fd, text.data() + done, text.size() - done);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return false;
        done += static_cast<std::size_t>(n);
    }
    return true;
}

// The standard stream (1, 2) that `path` is, when it is one (the same file: /dev/stdout, a shell's
// redirect named again); else -1.
int standard_stream(const fs::path& path) {
    struct stat at {};
    if (::stat(path.c_str(), &at) != 0) return -1;
    for (const int fd : {1, 2}) {
        struct stat open {};
        if (::fstat(fd, &open) == 0 && open.st_dev == at.st_dev && open.st_ino == at.st_ino) return fd;
    }
    return -1;
}

// Where `given` leads through its links (a link to a file, or to none yet, is written through).
fs::path link_target(const std::string& given) {
    std::error_code ec;
    fs::path target(given);
    for (int links = 0; fs::is_symlink(fs::symlink_status(target, ec)); ++links) {
        if (links == 40) fail(given, "file", "expected a path whose links end (40 followed)");
        const fs::path next = fs::read_symlink(target, ec);
        if (ec) fail(given, "file", fmt::format("expected a readable link ({})", ec.message()));
        target = next.is_absolute() ? next : target.parent_path() / next;
    }
    return fs::weakly_canonical(fs::absolute(target, ec), ec);
}

}  // namespace

void OutputFiles::input(const std::string& path) {
    std::error_code ec;
    if (fs::exists(path, ec)) inputs_.push_back(link_target(path));
}

void OutputFiles::add(const std::string& path, const std::string& text) {
    std::error_code ec;
    const fs::file_status status = fs::status(path, ec);  // (of what a link points to)
    if (fs::is_directory(status)) fail(path, "file", "expected a file to write, got a directory");
    const fs::path target = link_target(path);
    for (const Pending& p : pending_)
        if (p.path == target) fail(path, "file", "expected a path of its own (another output of this command is written there)");
    if (std::find(inputs_.begin(), inputs_.end(), target) != inputs_.end())
        fail(path, "file", "expected a path other than an input's (this command reads that file)");
    // This process's stdout or stderr (/dev/stdout, /proc/self/fd/1, the file a shell redirects it to):
    // written through the stream, in order with what the command prints; a device or a FIFO: written
    // into at commit(), never replaced.
    if (const int fd = standard_stream(path); fd >= 0) {
        if (fd == 1 && stdout_document_)
            fail(path, "file", "expected a path other than standard output (--json prints its document there)");
        pending_.push_back({{}, target, text, fd});
        return;
    }
    if (fs::exists(status) && !fs::is_regular_file(status)) {
        pending_.push_back({{}, fs::path(path), text, -1});
        return;
    }
    const fs::path folder = target.parent_path();
    if (!fs::is_directory(folder, ec)) fail(path, "file", "expected a writable path (its folder does not exist)");
    // Beside the destination, so the rename stays within one filesystem; a short name (the
    // destination's may already be as long as a name can be), made anew (O_EXCL: never a file or
    // link already there).
    std::string temp = (folder / ".mst-plan-XXXXXX").string();
    const int fd = ::mkstemp(temp.data());
    if (fd < 0) fail(path, "file", fmt::format("expected a writable path ({})", std::strerror(errno)));
    pending_.push_back({temp, target, {}, -1});
    const mode_t mask = ::umask(0);  // (mkstemp makes it 0600: the file gets what a new file gets)
    ::umask(mask);
    const bool written = ::fchmod(fd, 0666 & ~mask) == 0 && write_all(fd, text);
    if ((::close(fd) != 0) | !written) fail(path, "file", "expected a writable path (writing it failed)");
}

void OutputFiles::commit() {
    // Streams, devices and FIFOs first: one that cannot take its text fails the command before any
    // file is replaced. A FIFO without a reader is an error, not a wait.
    for (Pending& p : pending_) {
        if (!p.temp.empty()) continue;
        if (p.stream >= 0) {
            std::FILE* f = p.stream == 1 ? stdout : stderr;
            if (std::fwrite(p.text.data(), 1, p.text.size(), f) != p.text.size() || std::fflush(f) != 0)
                fail(p.path.string(), "file", fmt::format("expected a writable path ({})", std::strerror(errno)));
            continue;
        }
        const int fd = ::open(p.path.c_str(), O_WRONLY | O_NONBLOCK | O_CLOEXEC);
        if (fd < 0)
            fail(p.path.string(), "file",
                 errno == ENXIO ? std::string("expected a FIFO with a reader (none has it open)")
                                : fmt::format("expected a writable path ({})", std::strerror(errno)));
        const int flags = ::fcntl(fd, F_GETFL);
        const bool written = flags >= 0 && ::fcntl(fd, F_SETFL, flags & ~O_NONBLOCK) == 0 && write_all(fd, p.text);
        if ((::close(fd) != 0) | !written) fail(p.path.string(), "file", "expected a writable path (writing into it failed)");
    }
    // The files themselves wait for the command's end (finish_outputs).
    for (Pending& p : pending_)
        if (!p.temp.empty()) ready().files.push_back({std::move(p.temp), std::move(p.path)});
    ready().folders.insert(ready().folders.end(), created_.begin(), created_.end());
    pending_.clear();
    created_.clear();
}

void finish_outputs(bool keep) {
    Ready& r = ready();
    std::error_code ec;
    if (keep) {
        for (auto& [temp, path] : r.files) {
            fs::rename(temp, path, ec);
            if (ec) {
                const std::string failed = path.string(), why = ec.message();
                finish_outputs(false);  // (the rest removed: the command fails)
                fail(failed, "file", fmt::format("expected a writable path ({})", why));
            }
            temp.clear();
        }
        r = {};
        return;
    }
    for (const auto& f : r.files)
        if (!f.first.empty()) fs::remove(f.first, ec);
    for (auto it = r.folders.rbegin(); it != r.folders.rend(); ++it) fs::remove(*it, ec);  // only if still empty
    r = {};
}

}  // namespace mst::cli

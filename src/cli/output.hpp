#pragma once
// Plain-text tables and JSON printing shared by the subcommands.
#include <filesystem>
#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>

namespace mst::cli {

struct GlobalOptions {
    bool json = false;  // print JSON instead of tables
};

// A left/right aligned text table: the first column left, the others right.
class Table {
public:
    explicit Table(std::vector<std::string> header) : header_(std::move(header)) {}
    void row(std::vector<std::string> cells) { rows_.push_back(std::move(cells)); }
    void rule() { rows_.push_back({}); }  // a separator line
    std::string str() const;
    void print() const;

private:
    std::vector<std::string> header_;
    std::vector<std::vector<std::string>> rows_;
};

// JSON as the CLI prints and writes it; bytes that are not UTF-8 (a path given on the command
// line) become U+FFFD instead of an exception.
std::string json_text(const nlohmann::json& j, int indent = -1);
void print_json(const nlohmann::json& j);
void warn(const std::string& message);  // "warning: ..." on stderr, on one line

// The files one command writes, committed together. Each is written to a temporary file beside
// its destination when it is added (so an unwritable path fails early, naming it); commit() marks
// them ready, and they are renamed into place when the command has succeeded and what it printed
// reached stdout (finish_outputs, from main()). A command that fails leaves nothing behind: the
// destructor, or finish_outputs(false), removes the temporary files and the folders made for them.
// A symbolic link is written through (its target is replaced); this process's stdout or stderr
// (/dev/stdout, whatever it is) is written through the stream; a device or a FIFO is written into
// at commit(), never replaced. One path given for two outputs, or for an output and an input, is
// an error.
class OutputFiles {
public:
    // stdout_document: the command prints a document of its own on stdout (--json), which no output
    // may share.
    explicit OutputFiles(bool stdout_document = false) : stdout_document_(stdout_document) {}
    OutputFiles(const OutputFiles&) = delete;
    OutputFiles& operator=(const OutputFiles&) = delete;
    ~OutputFiles();

    // `path` is read by this command: no output may replace it (call before add()).
    void input(const std::string& path);
    void add(const std::string& path, const std::string& text);
    // Creates `dir` (and missing parents) for files added into it; removed again unless committed.
    void make_directory(const std::string& dir);
    void commit();

private:
    struct Pending {
        std::filesystem::path temp, path;  // temp empty: `path` is a stream, a device or a FIFO, written at commit()
        std::string text;                  // (what it receives)
        int stream = -1;                   // 1, 2: this process's stdout or stderr
    };
    std::vector<Pending> pending_;
    std::vector<std::filesystem::path> inputs_;  // where links lead
    std::vector<std::filesystem::path> created_;  // folders made here, parents first
    bool stdout_document_ = false;
};

// The end of the process's outputs: every file commit() left ready renamed into place (`keep`: the
// command succeeded and its output reached stdout; a rename that fails is an error, the rest then
// removed), or all of them removed with the folders made for them.
void finish_outputs(bool keep);

}  // namespace mst::cli

#pragma once
// Plain-text tables and JSON printing shared by the subcommands.
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

void print_json(const nlohmann::json& j);
// Writes `text` to `path`; an unwritable path is a user error naming it.
void write_text_file(const std::string& path, const std::string& text);
void warn(const std::string& message);  // "warning: ..." on stderr

}  // namespace mst::cli

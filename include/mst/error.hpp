#pragma once
// Errors a user can act on. A UserError carries the one line the CLI prints
// ("error: <file>: <field>: <what was expected>") and maps to exit code 2.
// Bugs are assertions, never UserErrors.
#include <stdexcept>
#include <string>
#include <vector>

namespace mst {

class UserError : public std::runtime_error {
public:
    using std::runtime_error::runtime_error;
};

// "<where>: <field>: <expected>", the one-line shape every input error takes.
[[noreturn]] void fail(const std::string& where, const std::string& field, const std::string& expected);

// `run()`, its input errors said in the name of the file that holds what it checks: "<path>: <error>".
template <class Run>
auto in_file(const std::string& path, Run&& run) {
    try {
        return run();
    } catch (const UserError& e) {
        throw UserError(path + ": " + e.what());
    }
}

// The entry of `known` nearest to `word` (fewest single-character edits, the first on a tie):
// what "did you mean" names for a misspelled key or subcommand. "" when `known` is empty.
std::string closest(const std::string& word, const std::vector<std::string>& known);

// `text` with every control character (newline, carriage return, escape, ...) and Unicode line break
// (U+0085 and the other C1 controls, U+2028, U+2029) written as an escape (\n, \r, \x1b, \u2028):
// user text quoted in a message or a comment stays on its line.
std::string printable(const std::string& text);
// 'text' as a message quotes a user's word: printable, cut at 60 characters.
std::string in_quotes(const std::string& text);

}  // namespace mst

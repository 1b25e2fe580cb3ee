#pragma once
// Errors a user can act on. A UserError carries the one line the CLI prints
// ("error: <file>: <field>: <what was expected>") and maps to exit code 2.
// Bugs are assertions, never UserErrors.
#include <stdexcept>
#include <string>

namespace mst {

class UserError : public std::runtime_error {
public:
    using std::runtime_error::runtime_error;
};

// "<where>: <field>: <expected>", the one-line shape every input error takes.
[[noreturn]] void fail(const std::string& where, const std::string& field, const std::string& expected);

}  // namespace mst

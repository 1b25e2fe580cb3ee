#include "mst/error.hpp"

#include <algorithm>

#include <fmt/format.h>

namespace mst {

void fail(const std::string& where, const std::string& field, const std::string& expected) {
    throw UserError(fmt::format("{}: {}: {}", where, field, expected));
}

std::string closest(const std::string& word, const std::vector<std::string>& known) {
    // Levenshtein distance with one row; both strings are short (keys, subcommand names).
    auto distance = [](const std::string& a, const std::string& b) {
        std::vector<std::size_t> row(b.size() + 1);
        for (std::size_t j = 0; j <= b.size(); ++j) row[j] = j;
        for (std::size_t i = 1; i <= a.size(); ++i) {
            std::size_t diagonal = row[0];
            row[0] = i;
            for (std::size_t j = 1; j <= b.size(); ++j) {
                const std::size_t above = row[j];
                row[j] = std::min({row[j] + 1, row[j - 1] + 1, diagonal + (a[i - 1] == b[j - 1] ? 0 : 1)});
                diagonal = above;
            }
        }
        return row[b.size()];
    };
    // A misspelling is short; a hostile key may be megabytes long: compare a bounded prefix.
    const std::string w = word.substr(0, 64);
    std::string best;
    std::size_t best_distance = 0;
    for (const std::string& k : known) {
        const std::size_t d = distance(w, k);
        if (best.empty() || d < best_distance) best = k, best_distance = d;
    }
    return best;
}

std::string printable(const std::string& text) {
    std::string out;
    out.reserve(text.size());
    for (std::size_t i = 0; i < text.size(); ++i) {
        const char c = text[i];
        const auto u = static_cast<unsigned char>(c);
        const auto byte = [&](std::size_t k) { return k < text.size() ? static_cast<unsigned char>(text[k]) : 0u; };
        if (c == '\n') out += "\\n";
        else if (c == '\r') out += "\\r";
        else if (c == '\t') out += "\\t";
        else if (u < 0x20 || u == 0x7f) out += fmt::format("\\x{:02x}", u);
        // Unicode's line breaks, which YAML and some terminals honour: NEL (U+0085; C1 controls
        // U+0080-U+009F), LINE and PARAGRAPH SEPARATOR (U+2028, U+2029), in UTF-8.
        else if (u == 0xc2 && byte(i + 1) >= 0x80 && byte(i + 1) <= 0x9f) out += fmt::format("\\u{:04x}", byte(++i));
        else if (u == 0xe2 && byte(i + 1) == 0x80 && (byte(i + 2) == 0xa8 || byte(i + 2) == 0xa9)) {
            out += fmt::format("\\u20{:02x}", byte(i + 2) - 0x80);
            i += 2;
        } else out += c;
    }
    return out;
}

std::string in_quotes(const std::string& text) {
    return fmt::format("'{}{}'", printable(text.substr(0, 60)), text.size() > 60 ? "..." : "");
}

}  // namespace mst

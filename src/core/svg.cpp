#include "mst/svg.hpp"

#include <algorithm>

#include <fmt/format.h>

namespace mst {

namespace {

constexpr double kWidth = 960, kHeight = 420, kLeft = 70, kRight = 170, kTop = 40, kBottom = 40;
constexpr const char* kColors[kCategoryCount] = {"#4e79a7", "#a0cbe8", "#f28e2b", "#ffbe7d", "#59a14f",
                                                  "#e15759", "#8cd17d", "#b6992d", "#9d7660"};
constexpr std::size_t kMaxPoints = 1500;

std::string escape(const std::string& s) {
    std::string out;
    for (char c : s) {
        if (c == '<') out += "&lt;";
        else if (c == '>') out += "&gt;";
        else if (c == '&') out += "&amp;";
        else out += c;
    }
    return out;
}

// Which events to draw: all when few, else in each bucket the one with the most live bytes.
std::vector<std::size_t> sample(const std::vector<bytes_t>& total) {
    std::vector<std::size_t> idx;
    if (total.size() <= kMaxPoints) {
        for (std::size_t i = 0; i < total.size(); ++i) idx.push_back(i);
        return idx;
    }
    const double per = static_cast<double>(total.size()) / kMaxPoints;
    for (std::size_t b = 0; b < kMaxPoints; ++b) {
        const auto lo = static_cast<std::size_t>(static_cast<double>(b) * per);
        const auto hi = std::min(total.size(), static_cast<std::size_t>(static_cast<double>(b + 1) * per));
        std::size_t best = lo;
        for (std::size_t i = lo; i < hi; ++i)
            if (total[i] > total[best]) best = i;
        idx.push_back(best);
    }
    return idx;
}

struct Frame {
    double x_max, y_max;
    double x(double v) const { return kLeft + v / std::max(x_max, 1.0) * (kWidth - kLeft - kRight); }
    double y(double bytes) const { return kHeight - kBottom - bytes / std::max(y_max, 1.0) * (kHeight - kTop - kBottom); }
};

std::string header(const std::string& title, const Frame& f) {
    std::string out = fmt::format(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{}\" font-family=\"sans-serif\" font-size=\"11\">\n"
        "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
        "<text x=\"{}\" y=\"22\" font-size=\"14\">{}</text>\n",
        kWidth, kHeight, kLeft, escape(title));
    for (int i = 0; i <= 4; ++i) {
        const double b = f.y_max * i / 4.0;
        out += fmt::format("<line x1=\"{:.1f}\" x2=\"{:.1f}\" y1=\"{:.1f}\" y2=\"{:.1f}\" stroke=\"#ddd\"/>"
                           "<text x=\"{:.1f}\" y=\"{:.1f}\" text-anchor=\"end\">{}</text>\n",
                           kLeft, kWidth - kRight, f.y(b), f.y(b), kLeft - 6, f.y(b) + 4, format_bytes(static_cast<bytes_t>(b)));
    }
    out += fmt::format("<text x=\"{:.1f}\" y=\"{:.1f}\" text-anchor=\"middle\">events (allocations and frees, in order)</text>\n",
                       (kLeft + kWidth - kRight) / 2, kHeight - 10);
    return out;
}

}  // namespace

std::string timeline_svg(const Timeline& t, const std::string& title) {
    // Live bytes per category after each GPU event.
    std::vector<CategoryBytes> live;
    std::vector<bytes_t> total;
    CategoryBytes cur{};
    for (const Event& e : t.events) {
        if (e.device == Device::Gpu) cur[static_cast<std::size_t>(e.category)] += e.alloc ? e.bytes : -e.bytes;
        live.push_back(cur);
        bytes_t sum = 0;
        for (bytes_t b : cur) sum += b;
        total.push_back(sum);
    }
    const auto idx = sample(total);
    const auto peak_it = std::max_element(total.begin(), total.end());
    const Frame f{static_cast<double>(std::max<std::size_t>(total.size(), 1)),
                  static_cast<double>(peak_it == total.end() ? 1 : *peak_it) * 1.05};
    std::string out = header(title, f);
    // Stacked areas, bottom to top in category order.
    for (int c = kCategoryCount - 1; c >= 0; --c) {
        std::string pts;
        for (std::size_t i : idx) {
            bytes_t top = 0;
            for (int k = 0; k <= c; ++k) top += live[i][static_cast<std::size_t>(k)];
            pts += fmt::format("{:.1f},{:.1f} ", f.x(static_cast<double>(i)), f.y(static_cast<double>(top)));
        }
        if (!idx.empty())
            pts += fmt::format("{:.1f},{:.1f} {:.1f},{:.1f}", f.x(static_cast<double>(idx.back())), f.y(0),
                               f.x(static_cast<double>(idx.front())), f.y(0));
        out += fmt::format("<polygon points=\"{}\" fill=\"{}\" stroke=\"none\"/>\n", pts, kColors[c]);
    }
    for (int c = 0; c < kCategoryCount; ++c)
        out += fmt::format("<rect x=\"{:.1f}\" y=\"{:.1f}\" width=\"10\" height=\"10\" fill=\"{}\"/>"
                           "<text x=\"{:.1f}\" y=\"{:.1f}\">{}</text>\n",
                           kWidth - kRight + 12, kTop + 16.0 * (kCategoryCount - 1 - c), kColors[c], kWidth - kRight + 26,
                           kTop + 9 + 16.0 * (kCategoryCount - 1 - c), to_string(static_cast<Category>(c)));
    if (peak_it != total.end()) {
        const auto pi = static_cast<std::size_t>(peak_it - total.begin());
        const Event& e = t.events[pi];
        out += fmt::format("<line x1=\"{0:.1f}\" x2=\"{0:.1f}\" y1=\"{1:.1f}\" y2=\"{2:.1f}\" stroke=\"black\" stroke-dasharray=\"4 3\"/>"
                           "<text x=\"{3:.1f}\" y=\"{4:.1f}\">peak {5} at {6} ({7}, layer {8})</text>\n",
                           f.x(static_cast<double>(pi)), f.y(static_cast<double>(*peak_it)), f.y(0),
                           std::min(f.x(static_cast<double>(pi)) + 4, kWidth - kRight - 260), kTop + 4,
                           format_bytes(*peak_it), escape(e.op), to_string(e.phase), e.layer);
    }
    return out + "</svg>\n";
}

std::string overlay_svg(const Timeline& predicted, const Timeline& measured, const std::string& title) {
    const auto a = live_curve(predicted), b = live_curve(measured);
    const bytes_t ymax = std::max(a.empty() ? 0 : *std::max_element(a.begin(), a.end()),
                                  b.empty() ? 0 : *std::max_element(b.begin(), b.end()));
    const Frame f{static_cast<double>(std::max<std::size_t>({a.size(), b.size(), 1})), static_cast<double>(ymax) * 1.05};
    std::string out = header(title, f);
    auto line = [&](const std::vector<bytes_t>& v, const char* color, const char* dash) {
        std::string pts;
        for (std::size_t i : sample(v)) pts += fmt::format("{:.1f},{:.1f} ", f.x(static_cast<double>(i)), f.y(static_cast<double>(v[i])));
        return fmt::format("<polyline points=\"{}\" fill=\"none\" stroke=\"{}\" stroke-width=\"1.5\" stroke-dasharray=\"{}\"/>\n",
                           pts, color, dash);
    };
    out += line(a, "#4e79a7", "none");
    out += line(b, "#e15759", "5 3");
    out += fmt::format("<text x=\"{:.1f}\" y=\"{:.1f}\" fill=\"#4e79a7\">predicted ({})</text>\n", kWidth - kRight + 12, kTop + 10,
                       predicted.source);
    out += fmt::format("<text x=\"{:.1f}\" y=\"{:.1f}\" fill=\"#e15759\">measured ({})</text>\n", kWidth - kRight + 12, kTop + 28,
                       measured.source);
    return out + "</svg>\n";
}

}  // namespace mst

#pragma once
// SVG plots of timelines: memory over the step, stacked by category with the peak
// marked; or two timelines' totals overlaid (predicted vs measured).
#include <string>

#include "mst/timeline.hpp"

namespace mst {

std::string timeline_svg(const Timeline& t, const std::string& title);
std::string overlay_svg(const Timeline& predicted, const Timeline& measured, const std::string& title);

}  // namespace mst

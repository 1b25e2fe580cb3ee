# Dependencies. Normally the installed (Debian) packages, found through their own CMake
# configs. A GPU machine has no package registry, so scripts/prepare-deps.sh copies the
# headers (CLI11, nlohmann_json, fmt, Eigen, doctest), doctest's CMake module and
# yaml-cpp (headers and static library) into MST_DEPS_DIR (.deps/, ignored by git), and
# this file falls back to imported targets on that folder for every package that is not
# installed; MST_USE_DEPS_DIR=ON takes all of them from there, so the build the GPU script
# runs can be rehearsed on a machine that has the packages.
#   fmt is a compiled library on Debian; from .deps it is used header-only
#   (FMT_HEADER_ONLY). yaml-cpp is compiled: .deps carries libyaml-cpp.a,
#   and MST_WITH_YAML=OFF builds without it (the axolotl emitter then reports that).
set(MST_DEPS_DIR "${PROJECT_SOURCE_DIR}/.deps" CACHE PATH "Header-only dependencies copied by scripts/prepare-deps.sh")
option(MST_USE_DEPS_DIR "Take every dependency from MST_DEPS_DIR, not from installed packages" OFF)
set(MST_WITH_YAML "AUTO" CACHE STRING "yaml-cpp for the axolotl emitter: ON, OFF or AUTO (when found)")
set_property(CACHE MST_WITH_YAML PROPERTY STRINGS AUTO ON OFF)

# An imported target on MST_DEPS_DIR/include/<subdir>, after checking that <header> is there.
function(mst_deps_target target header subdir)
  set(inc "${MST_DEPS_DIR}/include")
  if(subdir)
    set(inc "${inc}/${subdir}")
  endif()
  if(NOT EXISTS "${inc}/${header}")
    message(FATAL_ERROR "${target}: no installed package, and ${inc}/${header} is missing "
                        "(run scripts/prepare-deps.sh on a machine that has the packages)")
  endif()
  add_library(${target} INTERFACE IMPORTED GLOBAL)
  set_target_properties(${target} PROPERTIES INTERFACE_INCLUDE_DIRECTORIES "${inc}"
                                             INTERFACE_COMPILE_DEFINITIONS "${ARGN}")
  message(STATUS "mst-plan: ${target} from ${inc}")
endfunction()

if(NOT MST_USE_DEPS_DIR)
  find_package(CLI11 CONFIG QUIET)
  find_package(nlohmann_json 3.10 CONFIG QUIET)
  find_package(fmt CONFIG QUIET)
  find_package(Eigen3 3.4 CONFIG QUIET NO_MODULE)
  if(MST_BUILD_TESTS)
    find_package(doctest CONFIG QUIET)
  endif()
  if(NOT MST_WITH_YAML STREQUAL "OFF")
    find_package(yaml-cpp CONFIG QUIET)
  endif()
endif()

if(NOT TARGET CLI11::CLI11)
  mst_deps_target(CLI11::CLI11 CLI/CLI.hpp "")
endif()
if(NOT TARGET nlohmann_json::nlohmann_json)
  mst_deps_target(nlohmann_json::nlohmann_json nlohmann/json.hpp "")
endif()
if(NOT TARGET fmt::fmt)
  mst_deps_target(fmt::fmt fmt/format.h "" FMT_HEADER_ONLY=1)
endif()
if(NOT TARGET Eigen3::Eigen)
  mst_deps_target(Eigen3::Eigen Eigen/Core eigen3)
endif()
if(MST_BUILD_TESTS AND NOT TARGET doctest::doctest)
  mst_deps_target(doctest::doctest doctest/doctest.h "")
  # doctest_discover_tests() lives in doctest's CMake module, copied beside the headers.
  list(APPEND CMAKE_MODULE_PATH "${MST_DEPS_DIR}/cmake/doctest")
endif()

# yaml-cpp: the installed package, else the static library in .deps, else none.
set(MST_YAML_ENABLED OFF)
if(NOT MST_WITH_YAML STREQUAL "OFF")
  if(TARGET yaml-cpp)
    set(MST_YAML_ENABLED ON)
  elseif(EXISTS "${MST_DEPS_DIR}/lib/libyaml-cpp.a" AND EXISTS "${MST_DEPS_DIR}/include/yaml-cpp/yaml.h")
    add_library(yaml-cpp STATIC IMPORTED GLOBAL)
    set_target_properties(yaml-cpp PROPERTIES IMPORTED_LOCATION "${MST_DEPS_DIR}/lib/libyaml-cpp.a"
                                              INTERFACE_INCLUDE_DIRECTORIES "${MST_DEPS_DIR}/include")
    message(STATUS "mst-plan: yaml-cpp from ${MST_DEPS_DIR}/lib/libyaml-cpp.a")
    set(MST_YAML_ENABLED ON)
  elseif(MST_WITH_YAML STREQUAL "ON")
    message(FATAL_ERROR "MST_WITH_YAML=ON but yaml-cpp was found neither installed nor in ${MST_DEPS_DIR}")
  endif()
endif()
if(NOT MST_YAML_ENABLED)
  message(STATUS "mst-plan: built without yaml-cpp: `emit --format axolotl` reports that it is unavailable")
endif()

# The committed measurements (results/) against today's simulator: `mst-plan report results
# --check` must pass, and results/README.md must be exactly what it generates.
# Invoked by ctest: cmake -DMST=<binary> -DSRC=<source dir> -DOUT=<file> -P results_test.cmake
execute_process(COMMAND ${MST} report results --check --out ${OUT} WORKING_DIRECTORY ${SRC}
                RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "mst-plan report results --check: exit ${rc}\n${out}${err}")
endif()
execute_process(COMMAND ${CMAKE_COMMAND} -E compare_files ${OUT} ${SRC}/results/README.md RESULT_VARIABLE differ)
if(NOT differ EQUAL 0)
  message(FATAL_ERROR "results/README.md is not what `mst-plan report results` generates from the committed "
                      "measurements; regenerate it: mst-plan report results --out results/README.md")
endif()
message(STATUS "${out}")

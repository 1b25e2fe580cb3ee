# The planning commands' outputs are exactly the committed ones (tests/golden/cli/): the
# kernels-runtime files were written by the binary of commit c68fe71, before the simulator
# and the tuner were made faster (its defaults then: --runtime kernels --optimizer-impl
# foreach, now spelled out in cases.txt); the *-hf-* files by the first binary with the hf
# runtime. A difference here is a change in what mst-plan answers. The search
# time is the only part masked ("in <ms> ms", "search_ms").
# Invoked by ctest: cmake -DMST=<binary> -DGOLDEN=<tests/golden/cli> -DOUT=<dir> -P golden_test.cmake
# After an intended change of the outputs, rewrite the files with -DUPDATE=ON and review the diff.
file(STRINGS ${GOLDEN}/cases.txt lines REGEX "^[^#]")
file(MAKE_DIRECTORY ${OUT})
set(failed "")
foreach(line ${lines})
  string(FIND "${line}" "|" bar)
  string(SUBSTRING "${line}" 0 ${bar} name)
  math(EXPR from "${bar} + 1")
  string(SUBSTRING "${line}" ${from} -1 args)
  separate_arguments(args UNIX_COMMAND "${args}")
  execute_process(COMMAND ${MST} ${args} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT rc EQUAL 0)
    list(APPEND failed ${name})
    message(SEND_ERROR "${name}: mst-plan ${args}: exit ${rc}\n${err}")
    continue()
  endif()
  string(REGEX REPLACE "(searched with [0-9]+ simulations in )[0-9]+( ms)" "\\1<ms>\\2" out "${out}")
  string(REGEX REPLACE "(\"search_ms\": )[0-9.e+-]+" "\\1\"<ms>\"" out "${out}")
  if(UPDATE)
    file(WRITE ${GOLDEN}/${name}.txt "${out}")
    continue()
  endif()
  file(WRITE ${OUT}/${name}.txt "${out}")
  execute_process(COMMAND ${CMAKE_COMMAND} -E compare_files ${GOLDEN}/${name}.txt ${OUT}/${name}.txt RESULT_VARIABLE differ)
  if(NOT differ EQUAL 0)
    list(APPEND failed ${name})
    execute_process(COMMAND diff -u ${GOLDEN}/${name}.txt ${OUT}/${name}.txt OUTPUT_VARIABLE diff ERROR_QUIET)
    message(SEND_ERROR "${name}: mst-plan ${args}: output differs from ${GOLDEN}/${name}.txt\n${diff}")
  endif()
endforeach()
list(LENGTH lines total)
if(failed)
  message(FATAL_ERROR "golden outputs: ${failed} differ (of ${total} cases)")
endif()
message(STATUS "golden outputs: all ${total} cases equal")

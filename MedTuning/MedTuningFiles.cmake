# The files the extension ships besides MedTuning.py, relative to MEDTUNING_ROOT (the repository
# root, where MedTuningLib/ and Resources/ sit). Globbed, so a module added to the backend ships
# without an edit here; in a build, CONFIGURE_DEPENDS re-globs at build time.
#   MEDTUNING_LIB_SCRIPTS    every Python file of MedTuningLib except the browser app
#                            (MedTuningLib/web needs trame, which Slicer does not have)
#   MEDTUNING_LIB_DATA       package data: task presets and terminology
#   MODULE_PYTHON_RESOURCES  the module's .ui and icon
# Testing/test_slicer_module_static.py runs this file with `cmake -P` and compares the lists with
# the source tree.

set(_medtuning_depends CONFIGURE_DEPENDS)
if(CMAKE_SCRIPT_MODE_FILE)
  set(_medtuning_depends "")  # not allowed in script mode
endif()
file(GLOB_RECURSE MEDTUNING_LIB_SCRIPTS ${_medtuning_depends} RELATIVE "${MEDTUNING_ROOT}"
  "${MEDTUNING_ROOT}/MedTuningLib/*.py")
list(FILTER MEDTUNING_LIB_SCRIPTS EXCLUDE REGEX "^MedTuningLib/web/|/__pycache__/")
file(GLOB MEDTUNING_LIB_DATA ${_medtuning_depends} RELATIVE "${MEDTUNING_ROOT}"
  "${MEDTUNING_ROOT}/MedTuningLib/presets/*.json" "${MEDTUNING_ROOT}/MedTuningLib/presets/*.md")
file(GLOB_RECURSE MODULE_PYTHON_RESOURCES ${_medtuning_depends} RELATIVE "${MEDTUNING_ROOT}"
  "${MEDTUNING_ROOT}/Resources/*")
foreach(variable MEDTUNING_LIB_SCRIPTS MEDTUNING_LIB_DATA MODULE_PYTHON_RESOURCES)
  list(SORT ${variable})
endforeach()

if(CMAKE_SCRIPT_MODE_FILE)  # cmake -DMEDTUNING_ROOT=... -P MedTuningFiles.cmake: print the lists
  foreach(variable MEDTUNING_LIB_SCRIPTS MEDTUNING_LIB_DATA MODULE_PYTHON_RESOURCES)
    message("${variable}=${${variable}}")
  endforeach()
endif()

# The afm._afm extension module, shared by python/CMakeLists.txt (pip) and the repository's
# CMakeLists.txt (the test build). Expects the afm library target and nanobind to be found.
nanobind_add_module(_afm NB_STATIC ${CMAKE_CURRENT_LIST_DIR}/src/bindings.cpp)
target_link_libraries(_afm PRIVATE afm)

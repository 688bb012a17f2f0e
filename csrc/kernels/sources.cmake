# The kernel sources and their per-file instruction-set flags, shared by CMakeLists.txt and the
# test driver build (tests/cpu_kernel_build.py parses the same lists from this file: keep one
# `set(...)` per list and one flag list per ISA file).
set(_here ${CMAKE_CURRENT_LIST_DIR})
set(ZETA_KERNEL_SOURCES
    ${_here}/scalar.cpp ${_here}/isa.cpp ${_here}/threads.cpp ${_here}/run.cpp
    ${_here}/avx2.cpp ${_here}/avx512.cpp ${_here}/avx512vnni.cpp ${_here}/neon.cpp ${_here}/neon_dotprod.cpp)
set(ZETA_FLAGS_avx2 "-mavx2;-mfma")
set(ZETA_FLAGS_avx512 "-mavx2;-mfma;-mavx512f;-mavx512bw;-mavx512vl")
set(ZETA_FLAGS_avx512vnni "-mavx2;-mfma;-mavx512f;-mavx512bw;-mavx512vl;-mavx512vnni")
set(ZETA_FLAGS_neon_dotprod "-march=armv8.2-a+dotprod")
if(CMAKE_SYSTEM_PROCESSOR MATCHES "x86_64|AMD64|amd64")
  foreach(_isa avx2 avx512 avx512vnni)
    set_source_files_properties(${_here}/${_isa}.cpp PROPERTIES COMPILE_OPTIONS "${ZETA_FLAGS_${_isa}}")
  endforeach()
elseif(CMAKE_SYSTEM_PROCESSOR MATCHES "arm64|aarch64")
  set_source_files_properties(${_here}/neon_dotprod.cpp PROPERTIES COMPILE_OPTIONS "${ZETA_FLAGS_neon_dotprod}")
endif()

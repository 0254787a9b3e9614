# Finds the C++ Protobuf and gRPC libraries the specdec client links against; used by the build and
# by the installed specdecConfig.cmake alike.
#
# gRPC's own CMake package is preferred (a gRPC built with CMake, vcpkg, Debian's libgrpc-dev);
# where there is none, pkg-config's grpc++ (what some distributions ship instead). Set
# SPECDEC_GRPC_USE_PKGCONFIG=ON to skip the CMake package, for example when a broken one is
# installed. Sets SPECDEC_GRPCPP_TARGET, the target to link for gRPC C++.
find_package(Protobuf REQUIRED)

if(NOT SPECDEC_GRPC_USE_PKGCONFIG)
  find_package(gRPC CONFIG QUIET)
endif()
if(TARGET gRPC::grpc++)
  set(SPECDEC_GRPCPP_TARGET gRPC::grpc++)
else()
  find_package(PkgConfig REQUIRED)
  pkg_check_modules(SPECDEC_GRPCPP REQUIRED IMPORTED_TARGET grpc++)
  set(SPECDEC_GRPCPP_TARGET PkgConfig::SPECDEC_GRPCPP)
endif()

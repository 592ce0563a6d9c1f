{
  description = "chatcli: an authenticated, audited LLM gateway speaking the ChatCLI gRPC protocol";

  # Rust 1.95 (edition 2024) is needed: take a nixpkgs whose rustc is at least that.
  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs = { self, nixpkgs }:
    let
      cargo = (builtins.fromTOML (builtins.readFile ./Cargo.toml)).package;
      systems = [ "x86_64-linux" "aarch64-linux" ];
      forAllSystems = f: nixpkgs.lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});

      # systemd/chatcli.service, setting for setting, apart from ExecStart, ExecReload and
      # LoadCredential (which name store paths and the module's `credentials`). This part needs no
      # nixpkgs, so CI evaluates it and compares it with the unit file.
      systemdService = {
        environment = {
          CHATCLI_CONFIG = "%E/chatcli/chatcli.toml";
          CHATCLI_DATA_DIR = "%S/chatcli";
          CHATCLI_LOG_FILE = "%L/chatcli/chatcli.log";
        };
        serviceConfig = {
          Type = "notify";
          NotifyAccess = "main";
          WatchdogSec = "30s";
          TimeoutStopSec = "45s";
          Restart = "on-failure";
          RestartSec = "2s";
          RestartPreventExitStatus = "64 73 78";
          ConfigurationDirectory = "chatcli";
          StateDirectory = "chatcli";
          LogsDirectory = "chatcli";
          LimitNOFILE = 65536;

          DynamicUser = true;
          UMask = "0077";
          NoNewPrivileges = true;
          CapabilityBoundingSet = "";
          AmbientCapabilities = "";
          SecureBits = "noroot-locked";
          RestrictSUIDSGID = true;
          RemoveIPC = true;
          KeyringMode = "private";

          ProtectSystem = "strict";
          ProtectHome = true;
          PrivateTmp = true;
          PrivateDevices = true;
          DevicePolicy = "closed";
          ProtectProc = "invisible";
          ProcSubset = "pid";
          ProtectKernelTunables = true;
          ProtectKernelModules = true;
          ProtectKernelLogs = true;
          ProtectControlGroups = true;
          ProtectClock = true;
          ProtectHostname = true;
          PrivateUsers = true;

          RestrictAddressFamilies = [ "AF_INET AF_INET6 AF_UNIX" ];
          RestrictNamespaces = true;
          RestrictRealtime = true;
          LockPersonality = true;
          MemoryDenyWriteExecute = true;
          SystemCallArchitectures = "native";
          SystemCallFilter = [ "@system-service" "~@privileged @resources" ];
          SystemCallErrorNumber = "EPERM";
        };
      };
    in
    {
      lib = {
        inherit systemdService;
        version = cargo.version;
      };

      packages = forAllSystems (pkgs: rec {
        chatcli = pkgs.rustPlatform.buildRustPackage {
          pname = cargo.name;
          version = cargo.version;
          src = pkgs.lib.cleanSourceWith {
            src = ./.;
            filter = path: type:
              !(builtins.elem (baseNameOf path) [ "target" ".venv" ".git" "charts" "docker" "systemd" ]);
          };
          cargoLock.lockFile = ./Cargo.lock;
          # The suite needs Python grpcio peers and loopback servers: ./scripts/test.sh runs it.
          doCheck = false;
          meta = {
            description = cargo.description;
            license = pkgs.lib.licenses.asl20;
            mainProgram = "chatcli";
            platforms = pkgs.lib.platforms.linux;
          };
        };
        default = chatcli;
      });

      nixosModules.default = { config, lib, pkgs, ... }:
        let
          cfg = config.services.chatcli;
          toml = pkgs.formats.toml { };
          mainFile = toml.generate "chatcli.toml" cfg.settings;
          dropInFiles = lib.mapAttrs (name: value: toml.generate "${name}.toml" value) cfg.dropIns;
          port = cfg.settings.server.port or 50051;
          metricsPort = cfg.settings.metrics.port or 9090;
        in
        {
          options.services.chatcli = {
            enable = lib.mkEnableOption "the chatcli LLM gateway";
            package = lib.mkOption {
              type = lib.types.package;
              default = self.packages.${pkgs.stdenv.hostPlatform.system}.default;
              defaultText = lib.literalExpression "chatcli.packages.\${system}.default";
              description = "The chatcli package.";
            };
            settings = lib.mkOption {
              type = toml.type;
              default = { };
              example = lib.literalExpression ''
                {
                  llm.default = "openai";
                  llm.providers = [ { name = "openai"; kind = "openai"; api_key_file = "openai"; model = "gpt-4o-mini"; } ];
                  auth.token_file = "token";
                }
              '';
              description = ''
                chatcli.toml as Nix values (every key: config/chatcli.example.toml), written to
                /etc/chatcli/chatcli.toml. A change is applied with `systemctl reload` (SIGHUP, hot
                reload) on switch, not a restart. Relative `*_file` settings name `credentials`.
              '';
            };
            dropIns = lib.mkOption {
              type = lib.types.attrsOf toml.type;
              default = { };
              example = lib.literalExpression ''{ "50-anthropic".llm.providers = [ { name = "anthropic"; kind = "anthropic"; api_key_file = "anthropic"; } ]; }'';
              description = "Drop-ins written to /etc/chatcli/conf.d/<name>.toml, merged in name order.";
            };
            credentials = lib.mkOption {
              type = lib.types.attrsOf lib.types.path;
              default = { };
              example = { openai = "/run/keys/chatcli-openai"; token = "/run/keys/chatcli-token"; };
              description = ''
                Secrets passed with LoadCredential= (name → file outside the Nix store, readable by
                root). The config refers to each by its name, e.g. `api_key_file = "openai"`.
              '';
            };
            extraArgs = lib.mkOption {
              type = lib.types.listOf lib.types.str;
              default = [ ];
              description = "Extra arguments to `chatcli server`.";
            };
            openFirewall = lib.mkOption {
              type = lib.types.bool;
              default = false;
              description = "Open the gRPC + HTTP port and the metrics port.";
            };
          };

          config = lib.mkIf cfg.enable {
            environment.etc = {
              "chatcli/chatcli.toml".source = mainFile;
            } // lib.mapAttrs' (name: file: lib.nameValuePair "chatcli/conf.d/${name}.toml" { source = file; }) dropInFiles;

            systemd.services.chatcli = {
              description = "chatcli LLM gateway (gRPC + HTTP)";
              wantedBy = [ "multi-user.target" ];
              wants = [ "network-online.target" ];
              after = [ "network-online.target" ];
              startLimitIntervalSec = 300;
              startLimitBurst = 5;
              # A config change reloads (SIGHUP); a package change restarts.
              reloadTriggers = [ mainFile ] ++ lib.attrValues dropInFiles;
              inherit (systemdService) environment;
              serviceConfig = systemdService.serviceConfig // {
                ExecStart = lib.escapeShellArgs ([ (lib.getExe cfg.package) "server" ] ++ cfg.extraArgs);
                ExecReload = "${pkgs.coreutils}/bin/kill -HUP $MAINPID";
                LoadCredential = lib.mapAttrsToList (name: path: "${name}:${path}") cfg.credentials;
              };
            };

            networking.firewall.allowedTCPPorts = lib.mkIf cfg.openFirewall
              ([ port ] ++ lib.optional (metricsPort != 0) metricsPort);
          };
        };

      devShells = forAllSystems (pkgs: {
        default = pkgs.mkShell {
          inputsFrom = [ self.packages.${pkgs.stdenv.hostPlatform.system}.chatcli ];
          packages = with pkgs; [
            cargo
            rustc
            clippy
            rustfmt
            cargo-nextest
            (python3.withPackages (ps: [ ps.grpcio ps.grpcio-tools ps.yamllint ]))
            hadolint
            kubernetes-helm
            umoci
          ];
        };
      });
    };
}
